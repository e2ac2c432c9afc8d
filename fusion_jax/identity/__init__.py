"""Identity methods: one module each, behind the interface of `fusion_jax.identity.base`.

`BUILTIN_METHODS` lists the modules that register the built-in methods; `base.names()` / `base.get(name)` import
them on first use (not here: the UNet's modules import `identity.context`, so importing every method at package
import would be circular).
"""

BUILTIN_METHODS = (
    "fusion_jax.identity.fusion",  # face_fusion (seed 000)
    "fusion_jax.identity.single_token",  # single_token: the pooled one-token baseline
    "fusion_jax.identity.flashface",  # flashface (seed 002)
    "fusion_jax.identity.ip_adapter_faceid",  # ip_adapter_faceid: the IP-Adapter-FaceID baseline (published weights)
    "fusion_jax.identity.facestudio",  # facestudio (seed 001)
)
