"""The Inception-v3 network of FID (TensorFlow's 2015-12-05 graph as pytorch-fid ports it), in Flax NNX.

Why: FID is only comparable to published numbers when computed with this exact network and preprocessing.
pytorch-fid's `InceptionV3` (use_fid_inception=True) differs from torchvision's Inception-v3 in ways that move
FID: the average pools of the A, C and E_1 blocks do not count padded zeros (`count_include_pad=False`, as TF's
pooling), the last E block (Mixed_7c) pools with a 3x3 *max* pool, the input is resized to 299x299 with plain
bilinear interpolation (align_corners=False, no antialiasing) and scaled from [0, 1] to [-1, 1]. The features
are the 2048-d global average pool after Mixed_7c ("pool3"). BatchNorm uses eps 1e-3 and the stored statistics.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict (torchvision `Inception3` key names,
e.g. `Mixed_5b.branch1x1.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`). Read as safetensors, or from the
`.pth` pickle only with `allow_pickle=True`; `convert_fid_weights` writes the safetensors copy once. `fc.*` (the
1008-way classifier) and `num_batches_tracked` are not used by FID and are skipped.

`InceptionConfig.width_divisor` > 1 divides every convolution's channels (same topology, same key names): the
tiny random FID networks of tests and `--metric-models tiny` (meaningless numbers, same code path).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_FEATURE_DIM = 2048  # pool3 width of the full network
FID_INPUT_SIZE = 299  # pytorch-fid resizes every image to this square size
_SKIPPED_KEYS = (r"(^|\.)num_batches_tracked$", r"^fc\.", r"^AuxLogits\.")


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """Shape of the FID Inception network."""

    # Every convolution's output channels divided by this (1: the real FID network; tiny test models use 8 or 16).
    width_divisor: int = 1
    # Square size the input is resized to (bilinear, align_corners=False), as pytorch-fid's resize_input.
    input_size: int = FID_INPUT_SIZE

    def __post_init__(self):
        if self.width_divisor < 1 or 32 % self.width_divisor:
            raise ValueError(f"InceptionConfig.width_divisor must divide 32 (got {self.width_divisor})")
        if self.input_size < 75:
            raise ValueError(f"InceptionConfig.input_size must be >= 75 (Inception-v3's minimum), got "
                             f"{self.input_size}")

    def channels(self, n: int) -> int:
        return n // self.width_divisor

    @property
    def feature_dim(self) -> int:
        return self.channels(FID_FEATURE_DIM)


class BatchNorm(nnx.Module):
    """Inference BatchNorm with torch's parameter names (weight, bias, running_mean, running_var), eps 1e-3."""

    def __init__(self, num_features: int, *, eps: float = 1e-3, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.running_mean = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.running_var = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight.get_value() * jax.lax.rsqrt(self.running_var.get_value() + self.eps)
        return (x - self.running_mean.get_value()) * scale + self.bias.get_value()


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm -> ReLU, torchvision's BasicConv2d. kernel/stride/padding as (h, w)."""

    def __init__(self, n_in: int, n_out: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.conv = nnx.Conv(n_in, n_out, kernel, strides=stride, padding=[(p, p) for p in padding], use_bias=False,
                             rngs=rngs)
        self.bn = BatchNorm(n_out)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool (NHWC); padded positions never win (torch pads max pools with -inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool with padding 1 that divides by the in-image count (count_include_pad=False)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
    return total / count


class InceptionA(nnx.Module):
    """FIDInceptionA: 1x1 | 5x5 | double 3x3 | avg-pool (count_include_pad=False) + 1x1."""

    def __init__(self, n_in: int, pool_features: int, c, *, rngs):
        self.branch1x1 = BasicConv2d(n_in, c(64), 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(n_in, c(48), 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(n_in, c(64), 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(n_in, c(pool_features), 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_exclude_pad(x))], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (torchvision InceptionB): stride-2 3x3 | double 3x3 (stride 2) | 3x3 stride-2 max pool."""

    def __init__(self, n_in: int, c, *, rngs):
        self.branch3x3 = BasicConv2d(n_in, c(384), 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(n_in, c(64), 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC: 1x1 | 1x7-7x1 | double 7x1-1x7 | avg-pool (count_include_pad=False) + 1x1."""

    def __init__(self, n_in: int, channels_7x7: int, c, *, rngs):
        c7 = c(channels_7x7)
        self.branch1x1 = BasicConv2d(n_in, c(192), 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(n_in, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, c(192), (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(n_in, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(n_in, c(192), 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(avg_pool_exclude_pad(x))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (torchvision InceptionD): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | 3x3 stride-2 max pool."""

    def __init__(self, n_in: int, c, *, rngs):
        self.branch3x3_1 = BasicConv2d(n_in, c(192), 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(n_in, c(192), 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (avg pool, count_include_pad=False) or FIDInceptionE_2 (3x3 stride-1 max pool)."""

    def __init__(self, n_in: int, c, *, max_pool_branch: bool, rngs):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(n_in, c(320), 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(n_in, c(384), 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(n_in, c(448), 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(n_in, c(192), 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = jnp.concatenate([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=-1)
        pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_exclude_pad(x)
        return jnp.concatenate([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=-1)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) interpolation matrix of torch's bilinear resize with align_corners=False (no antialiasing):
    source = (dst + 0.5) * in / out - 0.5, clamped at 0; neighbours clamped at the last pixel."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), i0), 1.0 - w1)
    np.add.at(matrix, (np.arange(out_size), i1), w1)
    return matrix.astype(np.float32)


class FIDInceptionV3(nnx.Module):
    """pytorch-fid's InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True) -> pool3 features."""

    def __init__(self, config: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs):
        self.config = config
        c = config.channels
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), 3, rngs=rngs)
        self.Mixed_5b = InceptionA(c(192), 32, c, rngs=rngs)
        self.Mixed_5c = InceptionA(c(256), 64, c, rngs=rngs)
        self.Mixed_5d = InceptionA(c(288), 64, c, rngs=rngs)
        self.Mixed_6a = InceptionB(c(288), c, rngs=rngs)
        self.Mixed_6b = InceptionC(c(768), 128, c, rngs=rngs)
        self.Mixed_6c = InceptionC(c(768), 160, c, rngs=rngs)
        self.Mixed_6d = InceptionC(c(768), 160, c, rngs=rngs)
        self.Mixed_6e = InceptionC(c(768), 192, c, rngs=rngs)
        self.Mixed_7a = InceptionD(c(768), c, rngs=rngs)
        self.Mixed_7b = InceptionE(c(1280), c, max_pool_branch=False, rngs=rngs)
        self.Mixed_7c = InceptionE(c(2048), c, max_pool_branch=True, rngs=rngs)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """(N, H, W, 3) values in [0, 1] -> resized to input_size (bilinear, align_corners=False) in [-1, 1]."""
        size = self.config.input_size
        rows = jnp.asarray(bilinear_matrix(images.shape[1], size))
        cols = jnp.asarray(bilinear_matrix(images.shape[2], size))
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,nhwc->nowc", rows, images.astype(jnp.float32), precision=hp)
        x = jnp.einsum("pw,nowc->nopc", cols, x, precision=hp)
        return 2.0 * x - 1.0

    def __call__(self, images: jax.Array) -> jax.Array:
        """(N, H, W, 3) float images in [0, 1] (pytorch-fid's input range) -> (N, feature_dim) pool3 features."""
        x = self.preprocess(images)
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = max_pool(x, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))


def config_from_tensors(tensors: dict[str, np.ndarray], source: str = "checkpoint") -> InceptionConfig:
    """The width divisor implied by a state dict (32 / the first conv's output channels)."""
    key = "Conv2d_1a_3x3.conv.weight"
    if key not in tensors:
        raise ValueError(f"{source}: not an FID Inception state dict (no {key!r}; expected pytorch-fid's "
                         "pt_inception-2015-12-05 keys)")
    out = int(np.shape(tensors[key])[0])
    if out < 1 or 32 % out:
        raise ValueError(f"{source}: {key} has {out} output channels; expected 32 (or 32 / a divisor for tiny nets)")
    return InceptionConfig(width_divisor=32 // out)


def load_fid_inception(path: str | Path, *, allow_pickle: bool = False, flag: str = "--inception") -> FIDInceptionV3:
    """pytorch-fid's FID Inception weights (safetensors, or the .pth pickle with allow_pickle) -> our network."""
    from fusion_jax import weights

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file (expected pytorch-fid's pt_inception-2015-12-05 "
                                "weights as .safetensors, or the .pth with allow_pickle)")
    try:
        tensors = weights.read_tensors(path, allow_pickle=allow_pickle)
    except weights.CheckpointError as e:
        raise ValueError(f"{flag} {path}: {e}") from e
    config = config_from_tensors(tensors, f"{flag} {path}")
    return weights.build_from_tensors(lambda: FIDInceptionV3(config, rngs=nnx.Rngs(0)), tensors,
                                      source=f"{flag} {path}", ignore=_SKIPPED_KEYS)


def convert_fid_weights(pth: str | Path, out: str | Path) -> Path:
    """Trusted pytorch-fid .pth -> safetensors (float32, the keys FID uses), so later runs never unpickle."""
    from safetensors.numpy import save_file

    from fusion_jax import weights

    model = load_fid_inception(pth, allow_pickle=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.state_dict(model).items()}, str(out))
    return out


def fid_features(model: FIDInceptionV3, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """uint8 (N, H, W, 3) images -> (N, feature_dim) float64 pool3 features, in fixed-size jitted batches."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"fid_features expects uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        return nnx.merge(graphdef, state)(x.astype(jnp.float32) / 255.0)

    from fusion_jax.batching import map_padded_batches

    return map_padded_batches(lambda x: run(state, x), images, batch_size, (0, model.config.feature_dim))


def main(argv=None) -> int:
    """`python -m fusion_jax.models.inception convert pt_inception-2015-12-05-6726825d.pth OUT.safetensors`"""
    import argparse

    p = argparse.ArgumentParser(description="convert pytorch-fid's FID Inception .pth (trusted; unpickled once) to "
                                            "safetensors")
    p.add_argument("command", choices=["convert"])
    p.add_argument("pth", type=Path, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("out", type=Path, help="output .safetensors")
    args = p.parse_args(argv)
    print(f"wrote {convert_fid_weights(args.pth, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
