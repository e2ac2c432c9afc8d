"""IP-Adapter-FaceID (SD 1.5) as an identity method, loading the published weights.

ArcFace embedding (B, 512) -> `MLPProjModel` (Linear(512, 1024), GELU, Linear(1024, 4 * D), LayerNorm(D)) ->
4 tokens per face that enter *every* cross-attention layer through the UNet's shared identity token slot:
the published `to_k_ip` / `to_v_ip` are our `to_k_ref` / `to_v_ref`, combine 'decoupled'
(text attention + scale x attention over the face tokens), `scale` = the context's strength.

Published file layout (`ip-adapter-faceid_sd15.bin`, a torch pickle {'image_proj': {...}, 'ip_adapter': {...}},
or a `.safetensors` with flat `image_proj.*` / `ip_adapter.*` keys):
- `image_proj.proj.0.{weight,bias}`, `image_proj.proj.2.{weight,bias}`, `image_proj.norm.{weight,bias}`;
- `ip_adapter.{2j+1}.to_{k,v}_ip.weight` for the j-th cross-attention layer in the order of diffusers'
  `unet.attn_processors` (module registration order: down blocks, then up blocks, then the mid block; each
  transformer block contributes attn1 = 2j, attn2 = 2j+1);
- optionally the FaceID LoRA on every attention (`ip_adapter.{i}.to_{q,k,v,out}_lora.{down,up}.weight`, i over
  all attention processors in that order, rank 128 in the release): merged into the UNet at load time
  (W += up @ down, LoRA scale 1 as diffusers' `load_ip_adapter` applies it).

FaceID-Plus / PlusV2 (`image_proj.perceiver_resampler.*` keys): the ArcFace tokens (same MLP, width
`embed_dims`) are the latents of a 4-layer face perceiver resampler reading the face crop's CLIP ViT-H penultimate
hidden states (`clip_embeds`, (B, 257, 1280)); PlusV2 adds the shortcut `tokens = id_tokens + s_scale * resampler`
(`shortcut=True`, `s_scale`), a run-time setting (the files of Plus and PlusV2 have the same layout). Published keys:
`perceiver_resampler.{proj_in,proj_out,norm_out}`, `perceiver_resampler.layers.{i}.0.{norm1,norm2,to_q,to_kv,
to_out}` (attention; to_kv = [to_k; to_v]), `perceiver_resampler.layers.{i}.1.{0,1,3}` (LayerNorm, Linear, GELU,
Linear; no biases).

These facts come from diffusers' `_convert_ip_adapter_attn_to_diffusers`, `_convert_ip_adapter_image_proj_to_
diffusers`, `_load_ip_adapter_loras`, `IPAdapterFaceIDImageProjection` and `IPAdapterFaceIDPlusImageProjection`;
the code here is ours.

ArcFace embeddings come from insightface (`fusion_jax.data.faces`), which the jitted sampler cannot run: at
sampling time they come with the request (`ReferenceRequest.face_embeddings`, filled by the CLI's face detector),
else from `ip_adapter_faceid.face_embeddings` (a .npy file, `--face-embeddings`); training reads the batch key
'face_embedding'.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.identity.slots import copy_text_projections
from fusion_jax.identity.base import IdentityMethod, register
from fusion_jax.identity.context import IdentityContext
from fusion_jax.schedulers import add_noise, training_target

TRAINABLE = ("adapter", "adapter+lora")
UNCOND = ("zero_embedding", "text_only")
VARIANTS = ("faceid", "plus")
RESAMPLER_DEPTH = 4  # layers of the released face perceiver resampler (diffusers hard-codes 4 as well)
RESAMPLER_HEAD_DIM = 64
_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
_IP_KEY = re.compile(r"^(\d+)\.to_(k|v)_ip\.weight$")
_ADAPTER_PARAM = re.compile(r"(^|\.)(ip_image_proj\.|to_[kv]_ref\.)")
_LORA_PARAM = re.compile(r"(^|\.)lora\.lora_[ab]$")
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclass(frozen=True)
class IPAdapterFaceIDConfig:
    """`ip_adapter_faceid.*` options."""

    embedding_dim: int = 512  # ArcFace embedding width (insightface buffalo_l: 512)
    num_tokens: int = 4  # tokens per face embedding (the release: 4)
    mult: int = 2  # MLPProjModel hidden width = mult * embedding_dim (the release: 2)
    strength: float = 1.0  # IP-Adapter `scale` (0 = the base UNet exactly); --ip-scale
    uncond: Literal["zero_embedding", "text_only"] = "zero_embedding"  # 'cfg' guidance: the negative branch uses
    #   the tokens of a zero embedding (IP-Adapter's pipelines) or no identity at all (our generic form)
    face_embeddings: str | None = None  # sampling: .npy of ArcFace embeddings, (512,), (N, 512) or (K, N, 512)
    text_dropout: float = 0.05  # training: caption -> empty prompt (IP-Adapter's recipe: 0.05)
    face_dropout: float = 0.05  # training: face embedding -> zeros (IP-Adapter's recipe: 0.05)
    lora_rank: int = 4  # 'adapter+lora': rank of fresh LoRA adapters on the UNet attention
    variant: Literal["faceid", "plus"] = "faceid"  # MLP only, or the Plus face perceiver resampler (set by files)
    clip_dim: int = 1280  # Plus: width of the CLIP hidden states it reads (ViT-H/14: 1280)
    resampler_dim: int = 768  # Plus: resampler width embed_dims (SD 1.5 release: 768)
    resampler_heads: int = 12  # Plus: attention heads of the resampler (64 channels each)
    shortcut: bool = False  # PlusV2: tokens = id tokens + s_scale * resampler output
    s_scale: float = 1.0  # PlusV2: the shortcut's scale (IP-Adapter's `s_scale`)
    image_encoder: str | None = None  # Plus: folder of the CLIP ViT-H/14 image encoder (transformers layout, e.g.
    #   the IP-Adapter repo's models/image_encoder); --image-encoder

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"ip_adapter_faceid.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.shortcut and self.variant != "plus":
            raise ValueError("ip_adapter_faceid.shortcut (PlusV2) needs variant 'plus'")
        for key in ("clip_dim", "resampler_dim", "resampler_heads"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"ip_adapter_faceid.{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("embedding_dim", "num_tokens", "mult", "lora_rank"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"ip_adapter_faceid.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.strength < 0:
            raise ValueError(f"ip_adapter_faceid.strength must be >= 0, got {self.strength!r}")
        if self.uncond not in UNCOND:
            raise ValueError(f"ip_adapter_faceid.uncond must be one of {UNCOND}, got {self.uncond!r}")
        for key in ("text_dropout", "face_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"ip_adapter_faceid.{key} must be a probability in [0, 1], got {getattr(self, key)!r}")


class MLPProjModel(nnx.Module):
    """ArcFace embedding -> `num_tokens` tokens of width `cross_dim` (IP-Adapter-FaceID's image projection)."""

    def __init__(self, embedding_dim: int, cross_dim: int, num_tokens: int, mult: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_tokens, self.cross_dim = num_tokens, cross_dim
        self.fc1 = nnx.Linear(embedding_dim, embedding_dim * mult, **kw)  # published proj.0
        self.fc2 = nnx.Linear(embedding_dim * mult, cross_dim * num_tokens, **kw)  # published proj.2
        self.norm = nnx.LayerNorm(cross_dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                                  use_fast_variance=False, rngs=rngs)

    def __call__(self, embeds: jax.Array) -> jax.Array:
        """(M, embedding_dim) -> (M, num_tokens, cross_dim)."""
        x = jax.nn.gelu(self.fc1(embeds), approximate=False)
        x = self.fc2(x).reshape(embeds.shape[0], self.num_tokens, self.cross_dim)
        return self.norm(x.astype(jnp.float32)).astype(x.dtype)


class PerceiverAttention(nnx.Module):
    """Latents attend to [normed CLIP tokens; normed latents] (IP-Adapter's PerceiverAttention; no biases)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * RESAMPLER_HEAD_DIM
        self.heads = heads
        self.norm1 = _layer_norm(dim, rngs, param_dtype)
        self.norm2 = _layer_norm(dim, rngs, param_dtype)
        self.to_q, self.to_k, self.to_v = (nnx.Linear(dim, inner, **kw) for _ in range(3))
        self.to_out = nnx.Linear(inner, dim, **kw)

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        from fusion_jax.models.attention import dot_product_attention

        x, latents = _ln(self.norm1, x), _ln(self.norm2, latents)
        kv = jnp.concatenate([x, latents], axis=1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, RESAMPLER_HEAD_DIM)
        out = dot_product_attention(split(self.to_q(latents)), split(self.to_k(kv)), split(self.to_v(kv)),
                                    kernel="xla")
        return self.to_out(out.reshape(out.shape[0], out.shape[1], -1))


class PerceiverLayer(nnx.Module):
    """attn + residual, then LayerNorm -> Linear -> GELU -> Linear + residual."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = PerceiverAttention(dim, heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ff_norm = _layer_norm(dim, rngs, param_dtype)
        self.ff_fc1 = nnx.Linear(dim, 4 * dim, **kw)
        self.ff_fc2 = nnx.Linear(4 * dim, dim, **kw)

    def __call__(self, x, latents):
        latents = self.attn(x, latents) + latents
        return self.ff_fc2(jax.nn.gelu(self.ff_fc1(_ln(self.ff_norm, latents)), approximate=False)) + latents


class FacePerceiverResampler(nnx.Module):
    """CLIP hidden states (M, S, clip_dim) + latents (M, T, dim) -> (M, T, out_dim)."""

    def __init__(self, dim: int, clip_dim: int, out_dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = nnx.Linear(clip_dim, dim, **kw)
        self.layers = nnx.List([PerceiverLayer(dim, heads, **kw) for _ in range(RESAMPLER_DEPTH)])
        self.proj_out = nnx.Linear(dim, out_dim, **kw)
        self.norm_out = _layer_norm(out_dim, rngs, param_dtype)

    def __call__(self, clip_embeds, latents):
        x = self.proj_in(clip_embeds)
        for layer in self.layers:
            latents = layer(x, latents)
        return _ln(self.norm_out, self.proj_out(latents))


class ProjPlusModel(nnx.Module):
    """FaceID-Plus image projection: ArcFace -> id tokens (MLPProjModel at the resampler width), refined by the
    face perceiver resampler over the face crop's CLIP tokens; PlusV2's shortcut adds the id tokens back."""

    def __init__(self, cfg: "IPAdapterFaceIDConfig", cross_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_tokens, self.cross_dim, self.dim = cfg.num_tokens, cross_dim, cfg.resampler_dim
        self.fc1 = nnx.Linear(cfg.embedding_dim, cfg.embedding_dim * cfg.mult, **kw)
        self.fc2 = nnx.Linear(cfg.embedding_dim * cfg.mult, cfg.resampler_dim * cfg.num_tokens, **kw)
        self.norm = _layer_norm(cfg.resampler_dim, rngs, param_dtype)
        self.perceiver = FacePerceiverResampler(cfg.resampler_dim, cfg.clip_dim, cross_dim, cfg.resampler_heads, **kw)

    def __call__(self, embeds, clip_embeds, *, shortcut: bool = False, s_scale=1.0):
        """embeds (M, E), clip_embeds (M, S, clip_dim) -> (M, num_tokens, cross_dim)."""
        x = jax.nn.gelu(self.fc1(embeds), approximate=False)
        x = _ln(self.norm, self.fc2(x).reshape(embeds.shape[0], self.num_tokens, self.dim))
        out = self.perceiver(clip_embeds, x)
        if shortcut:
            if self.dim != self.cross_dim:
                raise ValueError(f"ip_adapter_faceid.shortcut: resampler width {self.dim} != cross-attention width "
                                 f"{self.cross_dim}")
            out = x + jnp.asarray(s_scale, out.dtype) * out
        return out


def _layer_norm(dim, rngs, param_dtype):
    return nnx.LayerNorm(dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
                         rngs=rngs)


def _ln(norm, x):
    return norm(x.astype(jnp.float32)).astype(x.dtype)


_PROJ_TO_OURS = (("proj.0.", "fc1."), ("proj.2.", "fc2."), ("norm.", "norm."))
_PLUS_LAYER = re.compile(
    r"^perceiver_resampler\.layers\.(\d+)\.(0\.(norm1|norm2|to_q|to_kv|to_out)|1\.(0|1|3))\.(weight|bias)$")
_PLUS_FF = {"0": "ff_norm", "1": "ff_fc1", "3": "ff_fc2"}


def _plus_to_ours(proj: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Published FaceID-Plus image_proj keys -> our ProjPlusModel keys (to_kv split into to_k / to_v)."""
    out = {}
    for key, value in proj.items():
        m = _PLUS_LAYER.match(key)
        if m:
            i, leaf = m.group(1), m.group(5)
            if m.group(3) == "to_kv":
                k, v = np.split(np.asarray(value), 2, axis=0)
                out[f"perceiver.layers.{i}.attn.to_k.{leaf}"] = k
                out[f"perceiver.layers.{i}.attn.to_v.{leaf}"] = v
            elif m.group(3):
                out[f"perceiver.layers.{i}.attn.{m.group(3)}.{leaf}"] = value
            else:
                out[f"perceiver.layers.{i}.{_PLUS_FF[m.group(4)]}.{leaf}"] = value
        elif key.startswith("perceiver_resampler."):
            out["perceiver." + key[len("perceiver_resampler."):]] = value
        else:
            for old, new in _PROJ_TO_OURS:
                if key.startswith(old):
                    out[new + key[len(old):]] = value
                    break
            else:
                raise ValueError(f"{source}: unexpected key image_proj.{key}")
    return out


def _ours_to_plus(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `_plus_to_ours` (to_k / to_v joined into to_kv)."""
    out = {}
    ff = {v: k for k, v in _PLUS_FF.items()}
    for key, value in sd.items():
        m = re.match(r"^perceiver\.layers\.(\d+)\.(attn\.(\w+)|(ff_\w+))\.(weight|bias)$", key)
        if m:
            i, leaf = m.group(1), m.group(5)
            if m.group(3) == "to_v":
                continue
            if m.group(3) == "to_k":
                out[f"perceiver_resampler.layers.{i}.0.to_kv.{leaf}"] = np.concatenate(
                    [value, sd[f"perceiver.layers.{i}.attn.to_v.{leaf}"]], axis=0)
            elif m.group(3):
                out[f"perceiver_resampler.layers.{i}.0.{m.group(3)}.{leaf}"] = value
            else:
                out[f"perceiver_resampler.layers.{i}.1.{ff[m.group(4)]}.{leaf}"] = value
        elif key.startswith("perceiver."):
            out["perceiver_resampler." + key[len("perceiver."):]] = value
        else:
            for old, new in _PROJ_TO_OURS:
                if key.startswith(new):
                    out[old + key[len(new):]] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# layer order of the published file
# ----------------------------------------------------------------------------------------------------------------


def processor_order(unet) -> list[str]:
    """Transformer-block layer names in the order of diffusers' `unet.attn_processors` (module registration
    order: down_blocks, up_blocks, mid_block), which numbers the published `ip_adapter.N.*` keys."""
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

    def key(name: str):
        part, *rest = name.split(".")
        return (rank[part],) + tuple(int(x) for x in rest if x.isdigit())

    return sorted(unet.transformer_blocks(), key=key)


def identity_layers(model) -> list[str]:
    """Layer names whose cross-attention carries the adapter's key/value projections."""
    return [n for n, b in model.transformer_blocks().items() if b.attn2.has_identity_slot]


# ----------------------------------------------------------------------------------------------------------------
# attaching, loading, exporting
# ----------------------------------------------------------------------------------------------------------------


def attach_adapter(unet, cfg: IPAdapterFaceIDConfig = IPAdapterFaceIDConfig(), *, rngs: nnx.Rngs | None = None):
    """Give `unet` a fresh adapter in place: `ip_image_proj` (random MLPProjModel) and, on every transformer
    block's `attn2`, `to_k_ref` / `to_v_ref` initialised as copies of its text `to_k` / `to_v` (IP-Adapter's
    training initialisation), combine 'decoupled'. Returns the UNet."""
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    blocks = unet.transformer_blocks()
    if not blocks:
        raise ValueError("ip_adapter_faceid: the UNet has no transformer block (no cross-attention to adapt)")
    cross_dims = {b.attn2.to_k.kernel.get_value().shape[0] for b in blocks.values()}
    if len(cross_dims) != 1:
        raise ValueError(f"ip_adapter_faceid: one token width serves every layer, but the UNet's cross-attention "
                         f"widths differ: {sorted(cross_dims)}")
    cross_dim = cross_dims.pop()
    dtype = next(iter(blocks.values())).attn2.to_k.dtype
    pdtype = next(iter(blocks.values())).attn2.to_k.kernel.get_value().dtype
    if cfg.variant == "plus":
        unet.ip_image_proj = ProjPlusModel(cfg, cross_dim, rngs=rngs, dtype=dtype, param_dtype=pdtype)
    else:
        unet.ip_image_proj = MLPProjModel(cfg.embedding_dim, cross_dim, cfg.num_tokens, cfg.mult, rngs=rngs,
                                          dtype=dtype, param_dtype=pdtype)
    copy_text_projections(unet, "decoupled", rngs=rngs)
    return unet


def read_published(path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """A published IP-Adapter file -> flat {'image_proj.*', 'ip_adapter.*': array}. `.safetensors` is read
    directly; a `.bin` torch pickle only with `allow_pickle=True` (then `torch.load(weights_only=True)`)."""
    from fusion_jax.weights import CheckpointError, PICKLE_SUFFIXES

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such IP-Adapter file")
    if path.suffix == ".safetensors":
        from fusion_jax.weights import read_tensors

        return read_tensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown IP-Adapter file type (expected .safetensors or a .bin torch pickle)")
    if not allow_pickle:
        raise CheckpointError(f"refusing to unpickle {path}: pickled checkpoints can run arbitrary code. Convert it "
                              "once with `python -m fusion_jax.convert ip_adapter_faceid SRC OUT.safetensors "
                              "--allow-pickle`, or pass allow_pickle=True if you trust the file.")
    import torch

    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict with 'image_proj' and 'ip_adapter', got {type(obj).__name__}")
    flat = {}
    for section, value in obj.items():
        if isinstance(value, dict):
            for k, v in value.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[section] = value
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in flat.items()}


def split_sections(tensors: dict[str, np.ndarray], source: str) -> tuple[dict, dict]:
    """Flat published keys -> (image_proj, ip_adapter) dicts; errors name `source` and the offending keys."""
    proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    adapter = {k[len("ip_adapter."):]: v for k, v in tensors.items() if k.startswith("ip_adapter.")}
    other = sorted(k for k in tensors if not k.startswith(("image_proj.", "ip_adapter.")))
    if not proj:
        raise ValueError(f"{source}: no 'image_proj.*' keys (expected an IP-Adapter-FaceID file with image_proj and "
                         f"ip_adapter sections; has {sorted(tensors)[:6]})")
    if not adapter:
        raise ValueError(f"{source}: no 'ip_adapter.*' keys (expected an IP-Adapter-FaceID file with image_proj and "
                         f"ip_adapter sections)")
    if other:
        raise ValueError(f"{source}: keys outside image_proj.* / ip_adapter.*: {other[:6]}")
    if "norm.weight" not in proj or "proj.0.weight" not in proj:
        raise ValueError(f"{source}: image_proj is not FaceID's MLPProjModel (needs proj.0 / proj.2 / norm; has "
                         f"{sorted(proj)[:6]})")
    return proj, adapter


def config_from_tensors(proj: dict[str, np.ndarray], base: IPAdapterFaceIDConfig | None = None
                        ) -> IPAdapterFaceIDConfig:
    """The config (embedding_dim, mult, num_tokens) implied by an image_proj state dict."""
    hidden, emb = proj["proj.0.weight"].shape
    width = proj["norm.weight"].shape[0]  # token width of the MLP (FaceID: cross dim; Plus: resampler dim)
    cfg = dataclasses.replace(base or IPAdapterFaceIDConfig(), embedding_dim=int(emb), mult=int(hidden // emb),
                              num_tokens=int(proj["proj.2.weight"].shape[0] // width))
    if "perceiver_resampler.proj_in.weight" in proj:
        dim, clip_dim = proj["perceiver_resampler.proj_in.weight"].shape
        return dataclasses.replace(cfg, variant="plus", clip_dim=int(clip_dim), resampler_dim=int(dim),
                                   resampler_heads=int(proj["perceiver_resampler.layers.0.0.to_q.weight"].shape[0]
                                                       // RESAMPLER_HEAD_DIM))
    return dataclasses.replace(cfg, variant="faceid", shortcut=False)


def merge_lora(unet, adapter: dict[str, np.ndarray], source: str, scale: float = 1.0) -> int:
    """Merge the FaceID LoRA of the `ip_adapter` section (`{i}.to_{q,k,v,out}_lora.{down,up}.weight`) into the
    UNet's attention kernels in place (W += scale * up @ down); returns the number of merged projections."""
    order = processor_order(unet)
    blocks = unet.transformer_blocks()
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in adapter.items():
        m = _LORA_KEY.match(key)
        if m:
            found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    for (idx, proj), pair in sorted(found.items()):
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{source}: ip_adapter.{idx}.to_{proj}_lora has only {sorted(pair)} (needs down and up)")
        if idx >= 2 * len(order):
            raise ValueError(f"{source}: ip_adapter.{idx}.to_{proj}_lora: the UNet has only {2 * len(order)} "
                             "attention processors")
        attn = getattr(blocks[order[idx // 2]], "attn1" if idx % 2 == 0 else "attn2")
        linear = attn.to_out[0] if proj == "out" else getattr(attn, f"to_{proj}")
        kernel = linear.kernel.get_value()
        delta = (np.asarray(pair["up"], np.float32) @ np.asarray(pair["down"], np.float32)).T  # (in, out)
        if delta.shape != tuple(kernel.shape):
            raise ValueError(f"{source}: ip_adapter.{idx}.to_{proj}_lora gives a {delta.shape[::-1]} update, layer "
                             f"{order[idx // 2]} has {tuple(kernel.shape)[::-1]} (torch (out, in))")
        linear.kernel.set_value((kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype))
    return len(found)


def merge_lora_file(unet, path, *, scale: float = 1.0) -> int:
    """Merge a separate LoRA file in the kohya / A1111 layout (`lora_unet_<module path with _>.lora_down.weight`,
    `.lora_up.weight`, optional `.alpha`; e.g. the published `ip-adapter-faceid*_sd15_lora.safetensors`, which
    IP-Adapter's README loads with diffusers' `load_lora_weights`) into the UNet's attention projections in place:
    W += scale * alpha / rank * up @ down (diffusers / PEFT's scaling). Only transformer-block attention projections
    (attn1 / attn2 to_q, to_k, to_v, to_out.0) are mapped; any other key is an error naming the file. Returns the
    number of merged projections."""
    from fusion_jax.weights import read_tensors

    path = Path(path)
    tensors = read_tensors(path)
    targets = {}
    for name, block in unet.transformer_blocks().items():
        for attn_name in ("attn1", "attn2"):
            attn = getattr(block, attn_name)
            for proj, linear in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v),
                                 ("to_out_0", attn.to_out[0])):
                targets["lora_unet_" + f"{name}.{attn_name}.{proj}".replace(".", "_")] = linear
    groups: dict[str, dict[str, np.ndarray]] = {}
    bad = []
    for key, value in tensors.items():
        stem, _, leaf = key.partition(".")
        if stem not in targets or leaf not in ("lora_down.weight", "lora_up.weight", "alpha"):
            bad.append(key)
            continue
        groups.setdefault(stem, {})[leaf] = value
    if bad:
        raise ValueError(f"{path}: LoRA keys that are not UNet transformer-attention projections of this UNet "
                         f"(kohya layout lora_unet_..._attn1_to_q.lora_down.weight expected): {sorted(bad)[:6]}")
    for stem, group in sorted(groups.items()):
        if "lora_down.weight" not in group or "lora_up.weight" not in group:
            raise ValueError(f"{path}: {stem} has {sorted(group)}, needs lora_down.weight and lora_up.weight")
        down = np.asarray(group["lora_down.weight"], np.float32)
        up = np.asarray(group["lora_up.weight"], np.float32)
        rank = down.shape[0]
        alpha = float(np.asarray(group.get("alpha", rank)))
        linear = targets[stem]
        kernel = linear.kernel.get_value()
        delta = (up @ down).T * (scale * alpha / rank)
        if delta.shape != tuple(kernel.shape):
            raise ValueError(f"{path}: {stem} gives a {delta.shape[::-1]} update, the layer is "
                             f"{tuple(kernel.shape)[::-1]} (torch (out, in))")
        linear.kernel.set_value((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    return len(groups)


def load_adapter_tensors(unet, tensors: dict[str, np.ndarray], source: str,
                         cfg: IPAdapterFaceIDConfig | None = None) -> tuple[object, IPAdapterFaceIDConfig]:
    """Attach an adapter to `unet` and fill it from flat published keys (every key mapped or reported, naming
    `source`); the LoRA keys, if any, are merged into the UNet. Returns (model, config)."""
    from fusion_jax import weights

    proj, adapter = split_sections(tensors, source)
    cfg = config_from_tensors(proj, cfg)
    attach_adapter(unet, cfg)
    renamed = _plus_to_ours(proj, source)
    weights.load_state_dict(unet.ip_image_proj, renamed, source=f"{source} (image_proj)")
    order = processor_order(unet)
    blocks = unet.transformer_blocks()
    ip_keys = {k for k in adapter if _IP_KEY.match(k)}
    unknown = sorted(k for k in adapter if k not in ip_keys and not _LORA_KEY.match(k))
    if unknown:
        raise ValueError(f"{source}: unexpected keys ip_adapter.{unknown[:6]}")
    expected = {f"{2 * j + 1}.to_{kv}_ip.weight" for j in range(len(order)) for kv in "kv"}
    if ip_keys != expected:
        missing, extra = sorted(expected - ip_keys), sorted(ip_keys - expected)
        raise ValueError(f"{source}: ip_adapter keys do not match this UNet's {len(order)} cross-attention layers: "
                         f"missing {['ip_adapter.' + k for k in missing[:6]]}, unexpected "
                         f"{['ip_adapter.' + k for k in extra[:6]]}")
    for j, name in enumerate(order):
        attn = blocks[name].attn2
        for kv, linear in (("k", attn.to_k_ref), ("v", attn.to_v_ref)):
            key = f"{2 * j + 1}.to_{kv}_ip.weight"
            w = np.asarray(adapter[key])
            kernel = linear.kernel.get_value()
            if w.T.shape != tuple(kernel.shape):
                raise ValueError(f"{source}: ip_adapter.{key} is {w.shape}, layer {name} needs "
                                 f"{tuple(kernel.shape)[::-1]} (torch (out, in))")
            linear.kernel.set_value(jnp.asarray(w.T, kernel.dtype))
    merge_lora(unet, adapter, source)
    return unet, cfg


def load(unet, path, *, allow_pickle: bool = False, cfg: IPAdapterFaceIDConfig | None = None, image_encoder=None,
         lora=None, lora_scale: float = 1.0):
    """A published IP-Adapter-FaceID file (`.bin` with allow_pickle, or `.safetensors`) onto our UNet (in place):
    returns the UNet with the adapter attached (and the FaceID LoRA merged when the file has it). Plus variants:
    `image_encoder` (our CLIP vision tower, or a folder for `encoders.load_clip_vision`, e.g. the IP-Adapter repo's
    `models/image_encoder`, CLIP ViT-H/14) lets the sampler compute `clip_embeds` from the reference crops.
    `lora`: a separate FaceID LoRA file (`*_lora.safetensors`, kohya layout) merged with `lora_scale`."""
    model, _ = load_adapter_tensors(unet, read_published(path, allow_pickle=allow_pickle), str(path), cfg)
    if lora is not None:
        merge_lora_file(model, lora, scale=lora_scale)
    if image_encoder is not None:
        attach_image_encoder(model, image_encoder)
    return model


def attach_image_encoder(model, image_encoder):
    """Give a Plus model the CLIP vision tower (module or folder) whose penultimate hidden states of the face crop
    are `clip_embeds` (frozen: no trainable preset selects it; not part of the adapter's export)."""
    if isinstance(image_encoder, (str, Path)):
        from fusion_jax import encoders

        image_encoder = encoders.load_clip_vision(image_encoder)
    model.ip_image_encoder = image_encoder
    return model


def clip_face_embeds(model, references: jax.Array) -> jax.Array:
    """Reference crops (..., H, W, 3) in [-1, 1] -> CLIP penultimate hidden states (..., S, C) through the model's
    `ip_image_encoder` (bicubic resize to its input size, CLIP normalisation, as CLIPImageProcessor does for a
    square crop)."""
    encoder = getattr(model, "ip_image_encoder", None)
    if encoder is None:
        raise ValueError("ip_adapter_faceid: a FaceID-Plus adapter needs the CLIP ViT-H image encoder for the face "
                         "crops: ip_adapter_faceid.load(..., image_encoder=FOLDER) or attach_image_encoder")
    refs = jnp.asarray(references, jnp.float32)
    lead, size = refs.shape[:-3], encoder.vision_model.config.image_size
    flat = refs.reshape((-1,) + refs.shape[-3:])
    flat = jax.image.resize((flat + 1.0) / 2.0, (flat.shape[0], size, size, 3), "bicubic")
    pixels = (jnp.clip(flat, 0.0, 1.0) - CLIP_MEAN) / CLIP_STD
    hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return hidden.reshape(lead + hidden.shape[1:])


def clip_zero_image_embeds(model, shape: tuple) -> jax.Array:
    """CLIP hidden states of an all-zero (normalised) image, broadcast to `shape` + (S, C): IP-Adapter Plus'
    negative image input."""
    encoder = model.ip_image_encoder
    size = encoder.vision_model.config.image_size
    hidden = encoder(jnp.zeros((1, size, size, 3), jnp.float32), output_hidden_states=True).hidden_states[-2]
    return jnp.broadcast_to(hidden[0], tuple(shape) + hidden.shape[1:])


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """The adapter in the published flat layout (`image_proj.*`, `ip_adapter.N.to_{k,v}_ip.weight`)."""
    from fusion_jax import weights

    if getattr(model, "ip_image_proj", None) is None:
        raise ValueError("ip_adapter_faceid: the model has no adapter (attach_adapter / load first)")
    out = {"image_proj." + k: v for k, v in _ours_to_plus(weights.state_dict(model.ip_image_proj)).items()}
    blocks = model.transformer_blocks()
    for j, name in enumerate(processor_order(model)):
        attn = blocks[name].attn2
        if not attn.has_identity_slot:
            raise ValueError(f"ip_adapter_faceid: layer {name} has no to_k_ref / to_v_ref")
        for kv, linear in (("k", attn.to_k_ref), ("v", attn.to_v_ref)):
            out[f"ip_adapter.{2 * j + 1}.to_{kv}_ip.weight"] = np.ascontiguousarray(
                np.asarray(linear.kernel.get_value()).T)
    return out


def save(model, path) -> Path:
    """Write the adapter as a published-layout `.safetensors` (what diffusers' `load_ip_adapter` reads)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(adapter_tensors(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# face embeddings -> IdentityContext
# ----------------------------------------------------------------------------------------------------------------


def is_plus(model) -> bool:
    """Whether the model's adapter is FaceID-Plus (reads CLIP face tokens)."""
    return isinstance(getattr(model, "ip_image_proj", None), ProjPlusModel)


def face_tokens(model, face_embeds, clip_embeds=None, *, shortcut: bool = False, s_scale=1.0, reference_valid=None
                ) -> tuple[jax.Array, jax.Array, int]:
    """Face embeddings (B, E), (B, N, E) or (B, K, N, E) (Plus: and `clip_embeds` with the same leading axes plus
    (S, clip_dim)) -> tokens (B, K*N*T, D), token identity (B, K*N*T; -1 for the tokens of references that
    `reference_valid` (B, K, N) marks as padding, never attended), K."""
    if getattr(model, "ip_image_proj", None) is None:
        raise ValueError("ip_adapter_faceid: the model has no adapter (ip_adapter_faceid.load / attach_adapter)")
    emb = jnp.asarray(face_embeds)
    e = model.ip_image_proj.fc1.kernel.get_value().shape[0]
    lead = emb.shape[:-1]
    if emb.ndim == 2:
        emb = emb[:, None, None]
    elif emb.ndim == 3:
        emb = emb[:, None]
    if emb.ndim != 4 or emb.shape[-1] != e:
        raise ValueError(f"face_embeds must be (B, {e}), (B, N, {e}) or (B, K, N, {e}) ArcFace embeddings, "
                         f"got shape {tuple(np.shape(face_embeds))}")
    b, k, n, _ = emb.shape
    proj = model.ip_image_proj
    flat = emb.reshape(b * k * n, e).astype(proj.fc1.dtype or jnp.float32)
    if is_plus(model):
        if clip_embeds is None:
            raise ValueError("ip_adapter_faceid: a FaceID-Plus adapter needs clip_embeds (the face crop's CLIP ViT-H "
                             "penultimate hidden states, (B, 257, 1280))")
        clip = jnp.asarray(clip_embeds)
        c = proj.perceiver.proj_in.kernel.get_value().shape[0]
        if tuple(clip.shape[:-2]) != tuple(lead) or clip.shape[-1] != c:
            raise ValueError(f"clip_embeds must be {tuple(lead)} + (S, {c}) to match face_embeds {tuple(lead)}, "
                             f"got shape {tuple(clip.shape)}")
        tokens = proj(flat, clip.reshape((b * k * n,) + clip.shape[-2:]).astype(flat.dtype), shortcut=shortcut,
                      s_scale=s_scale)
    else:
        if clip_embeds is not None or shortcut:
            raise ValueError("ip_adapter_faceid: clip_embeds / shortcut are for FaceID-Plus adapters; this one is "
                             "plain FaceID")
        tokens = proj(flat)  # (M, T, D)
    t = tokens.shape[1]
    tokens = tokens.reshape(b, k * n * t, tokens.shape[-1])
    ids = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None], (b, k, n))
    if reference_valid is not None:
        valid = jnp.asarray(reference_valid, bool)
        if valid.shape != (b, k, n):
            raise ValueError(f"reference_valid must be (B, K, N)={(b, k, n)} like face_embeds, got {valid.shape}")
        ids = jnp.where(valid, ids, -1)
    return tokens, jnp.repeat(ids.reshape(b, k * n), t, axis=1), k


def identity_context(model, face_embeds, scale=1.0, *, clip_embeds=None, shortcut: bool = False, s_scale=1.0,
                     region_masks=None, reference_valid=None) -> IdentityContext:
    """The IdentityContext of IP-Adapter-FaceID: the same face tokens for every adapted layer.

    face_embeds: (B, 512) one face per row; (B, N, 512) N images of one person (tokens concatenated, as diffusers
    does for several images); (B, K, N, 512) K people (then `region_masks`, see `fusion.region_masks_from_boxes`,
    say where each goes). scale: IP-Adapter's scale (scalar, (K,) or (B, K)); 0 gives the base UNet exactly.
    Plus: `clip_embeds` (face_embeds' leading axes + (257, 1280)); PlusV2: `shortcut=True` with `s_scale`.
    reference_valid (B, K, N): False for padding references, whose tokens are never attended."""
    from fusion_jax.identity.fusion import strength_array

    tokens, ids, k = face_tokens(model, face_embeds, clip_embeds, shortcut=shortcut, s_scale=s_scale,
                                 reference_valid=reference_valid)
    layers = identity_layers(model)
    return IdentityContext(reference_tokens={name: tokens for name in layers},
                           token_identity={name: ids for name in layers},
                           strength=strength_array(scale, tokens.shape[0], k), region_masks=region_masks)


def load_face_embeddings(path, dim: int, *, what: str = "ip_adapter_faceid.face_embeddings") -> np.ndarray:
    """A .npy of ArcFace embeddings, (E,), (N, E) or (K, N, E) -> (K, N, E) float32; errors name `what` and the file."""
    try:
        arr = np.load(str(path), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}={path}: cannot read a .npy array of face embeddings: {e}") from None
    arr = np.asarray(arr, np.float32)
    arr = arr.reshape((1, 1) + arr.shape) if arr.ndim == 1 else arr[None] if arr.ndim == 2 else arr
    if arr.ndim != 3 or arr.shape[-1] != dim:
        raise ValueError(f"{what}={path}: expected (E,), (N, E) or (K, N, E) with E={dim}, got {np.shape(arr)}")
    return arr


def request_face_embeddings(request, path, dim: int, batch: int, what: str) -> np.ndarray:
    """The ArcFace embeddings of a sampling request, (B, K, N, dim): `request.face_embeddings` (the CLI fills them
    from the face detector's recognition model), else the .npy file `path` (`what` = its config key, also settable
    with --face-embeddings) broadcast over the batch; errors name the argument."""
    k = np.shape(request.references)[1]
    if request.face_embeddings is not None:
        emb = np.asarray(request.face_embeddings, np.float32)
        if emb.ndim != 4 or emb.shape[:2] != (batch, k) or emb.shape[-1] != dim:
            raise ValueError(f"face_embeddings must be (B={batch}, K={k}, N, {dim}) ArcFace embeddings, got shape "
                             f"{emb.shape}")
        return emb
    if path is None:
        raise ValueError(f"{what.split('.')[0]} needs ArcFace embeddings of the reference faces: a face detector "
                         f"with a recognition model (generate(face_embeddings=...)), or --face-embeddings FILE.npy "
                         f"({what})")
    emb = load_face_embeddings(path, dim, what=what)
    if emb.shape[0] != k:
        raise ValueError(f"--face-embeddings {path}: embeddings of {emb.shape[0]} people, the references hold {k}")
    return np.broadcast_to(emb, (batch,) + emb.shape)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


def faceid_loss(model, batch: dict, rng: jax.Array, schedule, cfg: IPAdapterFaceIDConfig):
    """Denoising loss with face embeddings: batch 'latents', 'text_emb', 'empty_text_emb' (generic) and
    'face_embedding' (B, E) or (B, N, E); caption dropped with `text_dropout`, embedding zeroed with
    `face_dropout` (IP-Adapter's recipe), independently."""
    for key in ("latents", "text_emb", "empty_text_emb", "face_embedding"):
        if key not in batch:
            raise ValueError(f"ip_adapter_faceid loss: batch has no {key!r} (has {sorted(batch)}); 'face_embedding' "
                             "is the ArcFace embedding of the target's face crop")
    x0 = batch["latents"]
    b = x0.shape[0]
    k_t, k_noise, k_text, k_face = jax.random.split(rng, 4)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32).astype(x0.dtype)
    x_t = add_noise(schedule, x0, noise, t)
    drop_text = jax.random.bernoulli(k_text, cfg.text_dropout, (b,))
    ehs = jnp.where(drop_text[:, None, None], jnp.broadcast_to(batch["empty_text_emb"], batch["text_emb"].shape),
                    batch["text_emb"])
    emb = jnp.asarray(batch["face_embedding"])
    drop_face = jax.random.bernoulli(k_face, cfg.face_dropout, (b,))
    emb = jnp.where(drop_face.reshape((b,) + (1,) * (emb.ndim - 1)), 0.0, emb).astype(emb.dtype)
    ctx = identity_context(model, emb, cfg.strength)
    pred = model(x_t, t, ehs, batch.get("added_cond_kwargs"), identity=ctx).astype(jnp.float32)
    target = training_target(schedule, x0, noise, t).astype(jnp.float32)
    return jnp.mean((pred - target) ** 2), {"text_dropped": jnp.mean(drop_text.astype(jnp.float32)),
                                            "faces_dropped": jnp.mean(drop_face.astype(jnp.float32))}


def trainable_filter(preset: str):
    """'adapter': the image projection and the to_k_ref / to_v_ref; 'adapter+lora': plus the LoRA adapters."""
    if preset not in TRAINABLE:
        raise ValueError(f"train.trainable must be one of {TRAINABLE} for ip_adapter_faceid, got {preset!r}")

    def selected(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        key = ".".join(str(p) for p in path)
        return bool(_ADAPTER_PARAM.search(key)) or (preset == "adapter+lora" and bool(_LORA_PARAM.search(key)))

    return selected


# ----------------------------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------------------------


@register
class IPAdapterFaceID(IdentityMethod):
    """IP-Adapter-FaceID behind the identity-method interface."""

    name = "ip_adapter_faceid"
    section = "ip_adapter_faceid"
    config_class = IPAdapterFaceIDConfig
    trainable_presets = TRAINABLE
    batch_keys = ("face_embedding",)
    display_name = "IP-Adapter-FaceID"
    accepts_identity_masks = True  # regions from instance masks as well as boxes

    def attach(self, unet, cfg: IPAdapterFaceIDConfig, *, trainable: str = "all", rngs=None):
        attach_adapter(unet, cfg, rngs=rngs)
        if trainable == "adapter+lora":
            from fusion_jax.identity.slots import attach_lora

            attach_lora(unet, cfg.lora_rank, rngs=rngs)
        return unet

    def trainable_filter(self, preset: str, cfg):
        return trainable_filter(preset)

    def loss(self, model, batch, rng, schedule, cfg):
        return faceid_loss(model, batch, rng, schedule, cfg)

    def sampling_inputs(self, model, cfg: IPAdapterFaceIDConfig, request, *, batch, image_size, latent_size):
        from fusion_jax.identity.fusion import request_region_masks, strength_array

        if getattr(model, "ip_image_proj", None) is None:
            raise ValueError("ip_adapter_faceid: the UNet has no adapter; load one with ip_adapter_faceid.load(unet, "
                             "FILE) or --identity-weights (an export from `python -m fusion_jax.convert "
                             "ip_adapter_faceid`)")
        k = np.shape(request.references)[1]
        emb = request_face_embeddings(request, cfg.face_embeddings, cfg.embedding_dim, batch,
                                      "ip_adapter_faceid.face_embeddings")
        if is_plus(model):
            n = np.shape(request.references)[2]
            if emb.shape[2] != n:
                raise ValueError(f"--face-embeddings {cfg.face_embeddings}: {emb.shape[2]} embeddings per person; "
                                 f"FaceID-Plus pairs each with its reference crop and the references hold {n}")
            if getattr(model, "ip_image_encoder", None) is None:
                raise ValueError("ip_adapter_faceid: a FaceID-Plus adapter needs the CLIP ViT-H image encoder "
                                 "(ip_adapter_faceid.load(..., image_encoder=FOLDER))")
        out = {"face_embeds": jnp.asarray(emb),
               "strength": strength_array(cfg.strength if request.strength is None else request.strength, batch, k)}
        masks = request_region_masks(model, request, batch, k, image_size, latent_size)
        if masks is not None:
            out["region_masks"] = masks
        return out

    def encode_references(self, model, cfg, parts, key):
        """The face tokens once per image (and those of a zero embedding / zero image for IP-Adapter's negative
        branch); Plus: CLIP ViT-H of the reference crops through the model's image encoder."""
        inputs = parts.inputs
        emb = inputs["face_embeds"]
        kw = dict(region_masks=inputs.get("region_masks"))
        valid = inputs.get("reference_valid")
        if valid is not None and valid.shape == emb.shape[:3]:  # one embedding per reference (else: a file's own N)
            kw["reference_valid"] = valid
        clip = zero_clip = None
        if is_plus(model):
            clip = clip_face_embeds(model, inputs["references"])
            zero_clip = clip_zero_image_embeds(model, emb.shape[:-1])
            kw.update(shortcut=cfg.shortcut, s_scale=cfg.s_scale)
        ctx = identity_context(model, emb, inputs["strength"], clip_embeds=clip, **kw)
        zero = identity_context(model, jnp.zeros_like(emb), inputs["strength"], clip_embeds=zero_clip, **kw)
        return ctx, zero

    def guided_prediction(self, model, cfg, sampling_cfg, cache, parts, x_in, t, step, key):
        """'cfg' guidance with uncond 'zero_embedding': IP-Adapter's own form (the negative branch sees the tokens
        of a zero embedding); otherwise the generic identity guidance."""
        from fusion_jax.sampling import identity_guided_prediction
        from fusion_jax import schedulers

        ctx, zero = cache
        if sampling_cfg.reference_guidance == "cfg" and cfg.uncond == "zero_embedding":
            x2 = jnp.concatenate([x_in, x_in], axis=0)
            both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), zero, ctx)
            out = model(x2, t, jnp.concatenate([parts.text_uncond, parts.text_cond], axis=0), identity=both)
            eps_none, eps_ref = jnp.split(out.astype(jnp.float32), 2, axis=0)
            eps = eps_none + sampling_cfg.guidance_scale * (eps_ref - eps_none)
            if sampling_cfg.guidance_rescale > 0:
                eps = schedulers.guidance_rescale(eps, eps_ref, sampling_cfg.guidance_rescale)
            return eps
        return identity_guided_prediction(model, x_in, t, parts.text_uncond, parts.text_cond, ctx, sampling_cfg)

    def prepare_model(self, model, cfg):
        if cfg.image_encoder is not None and getattr(model, "ip_image_encoder", None) is None:
            if not is_plus(model):
                raise ValueError(f"ip_adapter_faceid.image_encoder={cfg.image_encoder}: only FaceID-Plus adapters "
                                 "read a CLIP image encoder; the loaded adapter is plain FaceID")
            try:
                attach_image_encoder(model, cfg.image_encoder)
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"ip_adapter_faceid.image_encoder {cfg.image_encoder}: cannot load the CLIP image "
                                 f"encoder ({e})") from e
            width = model.ip_image_encoder.config.hidden_size
            if width != cfg.clip_dim:
                raise ValueError(f"ip_adapter_faceid.image_encoder {cfg.image_encoder}: hidden width {width}, the "
                                 f"adapter reads {cfg.clip_dim}-wide CLIP states (ViT-H/14)")
        return model

    def export_tensors(self, model, cfg) -> dict[str, np.ndarray]:
        return adapter_tensors(model)

    def load_tensors(self, unet, cfg, tensors, source: str):
        model, _ = load_adapter_tensors(unet, dict(tensors), source, cfg)
        return model

    def add_arguments(self, parser) -> None:
        parser.add_argument("--ip-scale", type=float, default=None,
                            help="IP-Adapter scale (ip_adapter_faceid.strength; 0 = the base model)")
        parser.add_argument("--s-scale", type=float, default=None,
                            help="FaceID-PlusV2: the shortcut scale s_scale (turns the PlusV2 shortcut on)")
        parser.add_argument("--face-embeddings", default=None,
                            help="ArcFace embeddings of the reference faces, a .npy (512,), (N, 512) or (K, N, 512)")
        parser.add_argument("--image-encoder", default=None,
                            help="FaceID-Plus: CLIP ViT-H/14 image encoder folder (ip_adapter_faceid.image_encoder)")

    def apply_arguments(self, args, cfg, sampling_cfg):
        changes = {}
        if getattr(args, "ip_scale", None) is not None:
            if args.ip_scale < 0:
                raise ValueError(f"--ip-scale must be >= 0, got {args.ip_scale}")
            changes["strength"] = float(args.ip_scale)
        if getattr(args, "s_scale", None) is not None:
            if cfg.variant != "plus":
                raise ValueError(f"--s-scale is for FaceID-PlusV2 adapters; the loaded adapter is {cfg.variant!r}")
            changes.update(shortcut=True, s_scale=float(args.s_scale))
        if getattr(args, "face_embeddings", None) is not None:
            load_face_embeddings(args.face_embeddings, cfg.embedding_dim, what="--face-embeddings")
            changes["face_embeddings"] = str(args.face_embeddings)
        if getattr(args, "image_encoder", None) is not None:
            if not Path(args.image_encoder).is_dir():
                raise ValueError(f"--image-encoder {args.image_encoder}: no such folder")
            changes["image_encoder"] = str(args.image_encoder)
        return (dataclasses.replace(cfg, **changes) if changes else cfg), sampling_cfg


__all__ = ["IPAdapterFaceID", "IPAdapterFaceIDConfig", "MLPProjModel", "ProjPlusModel", "FacePerceiverResampler",
           "attach_adapter", "attach_image_encoder", "clip_face_embeds", "is_plus", "load", "save",
           "read_published", "load_adapter_tensors", "adapter_tensors", "merge_lora", "merge_lora_file",
           "processor_order",
           "identity_context", "face_tokens", "load_face_embeddings", "faceid_loss", "trainable_filter"]
