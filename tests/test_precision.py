"""`auto` compute dtype and attention kernel (fusion_jax/precision.py): the rule table per backend, CPU `auto` is
exactly the old float32 path, and a bfloat16 UNet forward stays within a bound of the float32 one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax import precision
from fusion_jax.config import TrainConfig, load_config
from fusion_jax.parallel import shard_batch, single_device_mesh
from fusion_jax.training import Trainer
from fusion_jax.training.synthetic import SyntheticBatches
from fusion_jax.training.tiny import BATCH_SPEC, make_tiny_model, tiny_loss
from tests.train_helpers import assert_trees_equal, host


@pytest.mark.parametrize("backend, want", [("gpu", "bfloat16"), ("tpu", "bfloat16"), ("rocm", "bfloat16"),
                                           ("cpu", "float32"), ("METAL", "float32")])
def test_auto_compute_dtype_per_backend(backend, want):
    assert precision.resolve_compute_dtype("auto", backend) == want
    for explicit in ("float32", "bfloat16"):  # an explicit choice is never changed
        assert precision.resolve_compute_dtype(explicit, backend) == explicit
    assert precision.compute_dtype("auto", backend) == jnp.dtype(want)


def test_unknown_compute_dtype_is_an_error():
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        precision.resolve_compute_dtype("float16", "gpu")


def _kernel(backend, dtype=jnp.bfloat16, head_dim=64, q_len=4096, kv_len=77, cc=(9, 0), **kw):
    return precision.resolve_attention_kernel("auto", backend=backend, dtype=dtype, head_dim=head_dim, q_len=q_len,
                                              kv_len=kv_len, compute_capability=cc, **kw)


def test_auto_attention_kernel_per_backend():
    # CUDA GPU: cuDNN flash attention for bf16 / fp16 at SD head dims (40, 64, 80, 160 on Hopper)
    for head_dim in (40, 64, 80, 160, 256):
        assert _kernel("gpu", head_dim=head_dim) == "cudnn"
    assert _kernel("gpu", dtype=jnp.float16) == "cudnn"
    # ... and XLA where cuDNN's constraints do not hold
    assert _kernel("gpu", dtype=jnp.float32) == "xla"  # float32 (e.g. upcast_attention) is not taken
    assert _kernel("gpu", head_dim=12) == "xla"  # not a multiple of 8
    assert _kernel("gpu", head_dim=264) == "xla"  # > 256
    assert _kernel("gpu", head_dim=160, cc=(8, 0)) == "xla"  # before Hopper the limit is 128 (SD1.5 on an A100)
    assert _kernel("gpu", head_dim=128, cc=(8, 0)) == "cudnn"
    assert _kernel("gpu", head_dim=160, cc=None) == "xla"  # unknown device: the safe limit
    # an additive bias under autodiff needs even sequence lengths (77 text tokens are odd)
    assert _kernel("gpu", has_bias=True, training=True) == "xla"
    assert _kernel("gpu", has_bias=True, training=True, kv_len=78) == "cudnn"
    assert _kernel("gpu", has_bias=True, training=False) == "cudnn"
    # TPU and ROCm: XLA; CPU: the heads-first blocked kernel at every length
    assert _kernel("tpu") == "xla" and _kernel("rocm") == "xla"
    assert _kernel("cpu", dtype=jnp.float32) == "chunked"
    assert _kernel("cpu", dtype=jnp.float32, q_len=64, kv_len=77) == "chunked"
    # ... in its own block size (the layers' query_chunk_size keeps 1024 for the identity attention elsewhere)
    assert precision.auto_query_block("cpu") == precision.CPU_QUERY_BLOCK == 128
    assert all(precision.auto_query_block(b) is None for b in ("gpu", "tpu", "rocm"))
    # an explicit kernel is never changed
    assert precision.resolve_attention_kernel("xla", backend="gpu", dtype=jnp.bfloat16, head_dim=64, q_len=8,
                                              kv_len=8) == "xla"


def test_cpu_auto_is_the_old_float32_path_exactly():
    assert jax.default_backend() == "cpu"
    assert TrainConfig().compute_dtype == "auto" and TrainConfig().param_dtype == "float32"
    config = load_config(None, ["model.unet_preset=tiny", "model.latents=preencoded", "data.source=synthetic"])
    assert config.train.compute_dtype == "auto"
    assert precision.compute_dtype(config.train.compute_dtype) == jnp.float32  # what the experiment builds in
    # two train steps with 'auto' and with 'float32': bit-identical losses, params and optimizer state
    mesh = single_device_mesh()
    runs = []
    for setting in ("auto", "float32"):
        cfg = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, cosine=False, compute_dtype=setting)
        trainer = Trainer(make_tiny_model, tiny_loss, cfg, mesh)
        state, batches, losses = trainer.init(), SyntheticBatches(BATCH_SPEC, 4, seed=0), []
        for _ in range(2):
            state, metrics = trainer.step(state, shard_batch(next(batches), mesh))
            losses.append(float(metrics["loss"]))
        runs.append((losses, host(state.params), host(state.opt_state)))
    assert runs[0][0] == runs[1][0] and runs[0][0][0] != runs[0][0][1]
    assert_trees_equal(runs[0][1], runs[1][1])
    assert_trees_equal(runs[0][2], runs[1][2])


# SD 1.x-shaped, two resolutions, cross-attention at the first; heads of 8 (tests/test_unet.py's SD1 config)
BF16_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None)


def test_bf16_unet_forward_is_close_to_fp32():
    """The train step's bf16 forward (params cast from the fp32 masters, activations in bf16) against fp32 on the
    same weights and inputs.

    Tolerance: bf16 keeps 8 significant bits, so each rounding (of a weight, an activation, a matmul / conv output
    accumulated in fp32) is a relative error up to 2^-9 ~ 2e-3. Independent roundings add in quadrature along this
    UNet's ~30 layers in series (convs, GroupNorms, attention, residual adds), and the norms divide by statistics
    that carry errors of their own, so the output's relative L2 error is expected at several x 2^-9, ~1e-2.
    Measured: 1.39e-2 .. 1.66e-2 over 4 seeds of these weights (jax 0.10 CPU). Bound: 5e-2 (3x the largest
    measurement, ~25 x 2^-9); a wrong cast (norms or softmax in bf16, fp16 overflow, params left bf16) gives
    errors of 1e-1 or more, or NaN. The lower bound 2^-12 shows bf16 really ran.
    """
    from fusion_jax.models.unet import UNet2DConditionModel, UNetConfig
    from fusion_jax.training.state import cast_floating

    config = UNetConfig(**BF16_UNET)
    graphdef32, abstract = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0))))
    graphdef16, _ = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0),
                                                                         dtype=jnp.bfloat16)))
    rng = np.random.default_rng(0)

    def weight(path, x):  # initialisation-like scales: norm scales ~1, biases ~0, kernels ~ 1/sqrt(fan-in)
        z = rng.standard_normal(x.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        if "['scale']" in name:
            return jnp.asarray(1.0 + 0.1 * z)
        if "['bias']" in name:
            return jnp.asarray(0.1 * z)
        return jnp.asarray(z / np.sqrt(np.prod(x.shape[:-1])))

    state = jax.tree_util.tree_map_with_path(weight, abstract)
    sample = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
    t = jnp.array([10, 700], jnp.int32)

    @jax.jit
    def forward(state):
        out32 = nnx.merge(graphdef32, state)(sample, t, text)
        out16 = nnx.merge(graphdef16, cast_floating(state, jnp.bfloat16))(sample, t, text)  # as the train step does
        return out32, out16

    out32, out16 = forward(state)
    assert out32.dtype == jnp.float32 and out16.dtype == jnp.float32  # the UNet returns its input's dtype
    out32, out16 = np.asarray(out32, np.float64), np.asarray(out16, np.float64)
    assert np.all(np.isfinite(out16))
    err = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert 2**-12 < err < 5e-2, err
