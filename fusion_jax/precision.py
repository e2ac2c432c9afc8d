"""What `auto` means for the compute dtype and the attention kernel on each backend: one rule table, read by
`resolve_compute_dtype` (per run) and `resolve_attention_kernel` (per attention call, at trace time).

    backend   compute dtype   attention kernel
    gpu       bfloat16        cudnn (fused flash attention) where cuDNN's constraints hold, else xla
    tpu       bfloat16        xla
    rocm      bfloat16        xla  (jax reports ROCm as 'gpu'; cuDNN does not exist there)
    cpu       float32         chunked  (heads-first, blocks of CPU_QUERY_BLOCK = 128 queries)
    other     float32         xla

Why:
- GPU / TPU: their matrix units run bfloat16 at about twice (H100 / H200: 989 vs 495 dense TFLOP/s against
  TF32; several times plain fp32) the float32 rate, and activations take half the memory and bandwidth.
  bfloat16 keeps float32's 8-bit exponent, so there is no overflow (the SD VAE overflows in float16) and no loss
  scaling; its 8-bit significand rounds each op to a relative 2^-9, which diffusion models tolerate (the public
  pipelines are run in half precision). `tests/test_precision.py` measures the bf16 UNet against fp32.
- Master weights stay float32 in training (`train.param_dtype`, default float32; `train.compute_dtype` is what
  the step casts them to): an AdamW update is ~lr = 1e-4 relative to the weight, far below bfloat16's 2^-9
  rounding, so updates applied to bfloat16 weights would mostly round away.
- Sampling (`fusion-jax generate --dtype auto`) loads the weights in the resolved dtype itself: there is no
  optimizer, so float32 copies would only double the memory and cast every weight again at every step.
- cuDNN's flash kernel (`jax.nn.dot_product_attention(..., implementation='cudnn')`) never materialises the
  (queries x keys) scores; jax raises for shapes it does not take, so `auto` picks it only where it holds:
  bfloat16 / float16 inputs, head dim a multiple of 8 and <= 256 (Hopper, compute capability 9.0+; <= 128
  before: SD1.5's 160-wide heads fall back to XLA on an A100), and with an additive bias in training both
  sequence lengths even (77-token text is odd). Everything else runs XLA's attention, which is always correct.
- CPU: float32 (bfloat16 has no fast CPU path). Attention runs `models.attention.blocked_attention` for every
  call, in blocks of 128 queries whatever the layer's `query_chunk_size` (which stays the block of an explicit
  'chunked' kernel and of the identity attention, 1024 by default): XLA:CPU's own (B, L, H, D) attention
  transposes the whole score tensor around each contraction, and a 1024 x 1024 score tensor per head falls out of
  cache; heads-first 128-query blocks made the `mid` UNet forward about 1.6x faster on 2 cores
  (`benchmarks/unet.py`, docs/DESIGN.md section 9), with the same outputs to float32 rounding (tests/test_unet.py
  compares both kernels with diffusers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CPU_QUERY_BLOCK = 128  # queries per block of CPU 'auto' attention: 8 heads x 128 x 1024 scores = 4 MiB


@dataclasses.dataclass(frozen=True)
class Rule:
    compute_dtype: str  # what compute_dtype 'auto' becomes
    attention: str  # what attention kernel 'auto' prefers ('cudnn' only where its constraints hold)
    query_block: Optional[int] = None  # queries per block when 'auto' runs 'chunked' (None: query_chunk_size)


RULES: dict[str, Rule] = {
    "gpu": Rule("bfloat16", "cudnn"),
    "tpu": Rule("bfloat16", "xla"),
    "rocm": Rule("bfloat16", "xla"),
    "cpu": Rule("float32", "chunked", query_block=CPU_QUERY_BLOCK),
}
FALLBACK = Rule("float32", "xla")


def current_backend() -> str:
    """`jax.default_backend()`, except 'rocm' for an AMD GPU (which jax also calls 'gpu')."""
    backend = jax.default_backend()
    if backend == "gpu" and "rocm" in _platform_version():
        return "rocm"
    return backend


@functools.lru_cache(maxsize=None)
def _platform_version() -> str:
    try:
        from jax.extend.backend import get_backend

        return str(get_backend().platform_version).lower()
    except Exception:  # noqa: BLE001  (a jax without jax.extend.backend: assume CUDA)
        return ""


@functools.lru_cache(maxsize=None)
def gpu_compute_capability() -> Optional[tuple[int, int]]:
    """(major, minor) of the first GPU, or None off-GPU / when jax does not say."""
    try:
        device = jax.devices()[0]
        major, minor = str(device.compute_capability).split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001
        return None


def resolve_compute_dtype(setting: str, backend: Optional[str] = None) -> str:
    """'auto' -> the backend's compute dtype name (table above); 'float32' / 'bfloat16' unchanged."""
    if setting not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {setting!r}")
    if setting != "auto":
        return setting
    return RULES.get(backend or current_backend(), FALLBACK).compute_dtype


def compute_dtype(setting: str, backend: Optional[str] = None):
    """`resolve_compute_dtype` as a jnp dtype (what a model's `dtype=` takes)."""
    return _DTYPES[resolve_compute_dtype(setting, backend)]


def auto_query_block(backend: str) -> Optional[int]:
    """Queries per block of 'auto' attention on `backend` when it runs 'chunked' (None: the layer's own setting)."""
    return RULES.get(backend, FALLBACK).query_block


def resolve_attention_kernel(
    setting: str,
    *,
    backend: str,
    dtype,
    head_dim: int,
    q_len: int,
    kv_len: int,
    has_bias: bool = False,
    training: bool = False,
    compute_capability: Optional[tuple[int, int]] = None,
) -> str:
    """'auto' -> 'cudnn' | 'xla' | 'chunked' for one attention call (table above); other kernels unchanged.

    `compute_capability` (GPU) decides cuDNN's head-dim limit: 256 from 9.0 (Hopper) on, 128 before or unknown.
    `has_bias` / `training`: an additive bias under autodiff needs both sequence lengths even in cuDNN.
    """
    if setting != "auto":
        return setting
    rule = RULES.get(backend, FALLBACK)
    if rule.attention == "cudnn":
        max_head = 256 if compute_capability is not None and compute_capability >= (9, 0) else 128
        eligible = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                    and head_dim % 8 == 0 and head_dim <= max_head
                    and not (has_bias and training and (q_len % 2 or kv_len % 2)))
        return "cudnn" if eligible else "xla"
    return rule.attention
