"""FID Inception (fusion_jax.models.inception) against a PyTorch reference on random weights.

Reference used and why: pytorch-fid's own `InceptionV3` cannot be imported here (pytorch_fid.inception imports
torchvision, which does not import on these machines). So `TorchFIDInception` below is pytorch-fid 0.3.0's network
re-written from torch.nn primitives, block by block from its source (`fid_inception_v3` = torchvision Inception3
with Mixed_5b/c/d -> FIDInceptionA, 6b-e -> FIDInceptionC, 7b -> FIDInceptionE_1, 7c -> FIDInceptionE_2, and the
`InceptionV3` wrapper's resize / normalise / blocks 0-3), with the same module names so that its `state_dict()`
has the keys of pt_inception-2015-12-05-6726825d.pth. The TF-graph quirks are torch's own ops here
(F.avg_pool2d(count_include_pad=False), F.max_pool2d in E_2, F.interpolate(bilinear, align_corners=False)), so
the JAX side's hand-written pooling and resize matrices are checked against independent code.
The channel widths are divided by `DIV` to keep the test fast; the key set and shapes of the full-width network
are checked separately (shape only, nothing run).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flax import nnx
from safetensors.torch import save_file

from fusion_jax.models import inception

DIV = 16


class BasicConv2d(nn.Module):
    def __init__(self, n_in, n_out, **kw):
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, bias=False, **kw)
        self.bn = nn.BatchNorm2d(n_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class A(nn.Module):
    def __init__(self, n_in, pool, c):
        super().__init__()
        self.branch1x1 = BasicConv2d(n_in, c(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(n_in, c(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(n_in, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(n_in, c(pool), kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class B(nn.Module):
    def __init__(self, n_in, c):
        super().__init__()
        self.branch3x3 = BasicConv2d(n_in, c(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(n_in, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class C(nn.Module):
    def __init__(self, n_in, c7, c):
        super().__init__()
        c7 = c(c7)
        self.branch1x1 = BasicConv2d(n_in, c(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(n_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(n_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(n_in, c(192), kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, d, bp], 1)


class D(nn.Module):
    def __init__(self, n_in, c):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(n_in, c(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(n_in, c(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class E(nn.Module):
    def __init__(self, n_in, c, use_max):
        super().__init__()
        self.use_max = use_max
        self.branch1x1 = BasicConv2d(n_in, c(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(n_in, c(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(n_in, c(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(n_in, c(192), kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.use_max:  # FIDInceptionE_2
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:  # FIDInceptionE_1
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    """pytorch-fid InceptionV3(output_blocks=[3]) in torch.nn primitives (see the module docstring)."""

    def __init__(self, div=1):
        super().__init__()
        c = lambda n: n // div  # noqa: E731
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(c(192), 32, c), A(c(256), 64, c), A(c(288), 64, c)
        self.Mixed_6a = B(c(288), c)
        self.Mixed_6b, self.Mixed_6c = C(c(768), 128, c), C(c(768), 160, c)
        self.Mixed_6d, self.Mixed_6e = C(c(768), 160, c), C(c(768), 192, c)
        self.Mixed_7a = D(c(768), c)
        self.Mixed_7b, self.Mixed_7c = E(c(1280), c, False), E(c(2048), c, True)
        self.fc = nn.Linear(c(2048), 1008)  # in the checkpoint, unused by FID

    def forward(self, x):  # x: (N, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random conv weights and BatchNorm statistics/affines (BN at identity would hide a mis-mapped BN key)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("bn.weight",)):
                t.copy_(0.8 + 0.4 * torch.rand(t.shape, generator=g))
            elif name.endswith(("running_mean", "bn.bias")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:  # conv / fc weights, fan-in scaled so activations stay O(1) through 16 blocks
                fan_in = int(np.prod(t.shape[1:])) if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model.eval()


def test_bilinear_matrix_is_torch_interpolate():
    """The resize matrices are torch's bilinear (align_corners=False) for down- and up-sampling."""
    x = torch.rand(1, 1, 37, 53, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for size in ((299, 299), (11, 20)):
        expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        ours = inception.bilinear_matrix(37, size[0]).astype(np.float64) @ x[0, 0].numpy() @ \
            inception.bilinear_matrix(53, size[1]).astype(np.float64).T
        np.testing.assert_allclose(ours, expected, atol=1e-6)  # float32 matrices: ~1e-7 relative per weight


def test_fid_inception_matches_torch_reference(tmp_path):
    torch_model = _randomize(TorchFIDInception(DIV), seed=0)
    sd = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    save_file(sd, str(tmp_path / "inception.safetensors"))
    ours = inception.load_fid_inception(tmp_path / "inception.safetensors")
    assert ours.config.width_divisor == DIV
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)  # not square, upsampled to 299
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()
    got = inception.fid_features(ours, images, batch_size=2)
    assert got.shape == (2, 2048 // DIV)
    err = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"FID Inception (width/{DIV}) vs torch reference: max abs error / max |feature| = {err:.2e}")
    # 94 float32 conv layers, XLA vs oneDNN summation orders: a few 1e-6 relative per layer compounds to ~1e-5.
    assert err < 1e-4


def test_full_width_checkpoint_layout_loads_shape_only():
    """Every key of the full-width (real pt_inception-2015-12-05) state dict maps onto a parameter of our network with
    the layout-converted shape, and nothing else is left (checked on shapes only: nothing is allocated or run)."""
    with torch.device("meta"):  # shapes only: no 23M-parameter random init
        torch_model = TorchFIDInception(1)
    shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()
              if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    ours = nnx.eval_shape(lambda: inception.FIDInceptionV3(rngs=nnx.Rngs(0)))
    params = {tuple(str(getattr(p, "key", p)) for p in path): tuple(v.get_value().shape)
              for path, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert inception.config_from_tensors({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3))}).width_divisor == 1
    mapped = set()
    for key, shape in shapes.items():
        parts = tuple(key.split("."))
        if parts[-1] == "weight" and parts[-2] == "conv":  # Conv2d (O, I, kh, kw) -> our kernel (kh, kw, I, O)
            ours_key, expected = parts[:-1] + ("kernel",), (shape[2], shape[3], shape[1], shape[0])
        else:  # BatchNorm buffers and affine parameters keep torch's names and shapes
            ours_key, expected = parts, shape
        assert params.get(ours_key) == expected, key
        mapped.add(ours_key)
    assert mapped == set(params)  # no parameter of ours is missing from the checkpoint
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(int(np.prod(s)) for s in params.values())


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception .*missing.safetensors: no such file"):
        inception.load_fid_inception(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: not an FID Inception state dict"):
        inception.load_fid_inception(tmp_path / "other.safetensors")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        inception.load_fid_inception(tmp_path / "w.pth")


def test_convert_pth_to_safetensors_round_trip(tmp_path):
    """A trusted .pth (the published file's format) converts once to safetensors holding the same tensors."""
    torch_model = _randomize(TorchFIDInception(DIV), seed=1)
    torch.save(torch_model.state_dict(), tmp_path / "pt_inception.pth")
    assert inception.main(["convert", str(tmp_path / "pt_inception.pth"), str(tmp_path / "w.safetensors")]) == 0
    from safetensors.numpy import load_file

    converted = load_file(str(tmp_path / "w.safetensors"))
    expected = {k: v.numpy() for k, v in torch_model.state_dict().items()
                if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert set(converted) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(converted[k], v)
