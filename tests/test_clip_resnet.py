"""CLIP ModifiedResNet (RN50 / RN101 family) parity against a PyTorch reference on random weights (float32).

Reference: `open_clip` cannot be imported beside the project's torch 2.13.0 CPU wheel (it needs torchvision, and
PyPI's torchvision fails to import with that torch: "operator torchvision::nms does not exist"). So the reference
is `TorchModifiedResNet` below, an independent PyTorch re-statement of OpenAI CLIP's `ModifiedResNet` written from
the published architecture, in NCHW with torch's own Conv2d / BatchNorm2d / AvgPool2d and
`F.multi_head_attention_forward` for the attention pool, and with the module names of OpenAI / open_clip state
dicts, so its `state_dict()` (under `visual.`) is the checkpoint layout we load.

Tolerance: relative L2 < 1e-4, as the other parity tests. Both sides compute in float32 with random running
statistics; the remaining difference is summation order (measured around 1e-6 after ~20 convolutions).
"""

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import save_file
from torch import nn

from fusion_jax import encoders, weights
from fusion_jax.models import clip_resnet
from fusion_jax.models.clip_resnet import CLIPResNetConfig, ModifiedResNet
from parity_helpers import nchw, rel_l2

REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------------------
# Independent PyTorch reference (OpenAI CLIP's ModifiedResNet, restated)
# ---------------------------------------------------------------------------------------------------------


class TorchBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride > 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, 4 * planes, 1, bias=False)),
                ("1", nn.BatchNorm2d(4 * planes)),
            ]))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.pool(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut)


class TorchAttentionPool(nn.Module):
    def __init__(self, grid, dim, heads, out_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads

    def forward(self, x):
        seq = x.flatten(2).permute(2, 0, 1)  # (HW, N, C)
        seq = torch.cat([seq.mean(0, keepdim=True), seq]) + self.positional_embedding[:, None]
        out, _ = F.multi_head_attention_forward(
            query=seq[:1], key=seq, value=seq, embed_dim_to_check=seq.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False,
        )
        return out[0]


class TorchModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim, heads, image_size, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        inplanes = width
        for stage, blocks in enumerate(layers):
            planes = width * 2**stage
            seq = []
            for block in range(blocks):
                seq.append(TorchBottleneck(inplanes, planes, 2 if stage and not block else 1))
                inplanes = 4 * planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*seq))
        self.attnpool = TorchAttentionPool(image_size // 32, width * 32, heads, output_dim)

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = F.avg_pool2d(x, 2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x), x


def reference(config: CLIPResNetConfig, seed: int) -> TorchModifiedResNet:
    """The torch reference with every parameter and running statistic random (bn3 scales not zero)."""
    torch.manual_seed(seed)
    model = TorchModifiedResNet(config.layers, config.output_dim, config.heads, config.image_size, config.width)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(0.1 * noise)
            elif ".bn" in name or name.startswith("bn") or "downsample.1" in name:  # BatchNorm scale
                t.copy_(1.0 + 0.2 * noise)
            elif t.ndim == 4:  # conv: He-like scale keeps activations O(1) through the stages
                t.copy_(noise * (2.0 / (t.shape[1] * t.shape[2] * t.shape[3])) ** 0.5)
            else:
                t.copy_(noise * t.shape[-1] ** -0.5)
    return model.eval()


def openai_layout(model: nn.Module) -> dict[str, np.ndarray]:
    """A full CLIP checkpoint as OpenAI / open_clip save it: the tower under `visual.`, plus text-tower keys."""
    tensors = {"visual." + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    tensors.update({
        "token_embedding.weight": np.zeros((10, 4), np.float32),
        "positional_embedding": np.zeros((5, 4), np.float32),
        "transformer.resblocks.0.attn.in_proj_weight": np.zeros((12, 4), np.float32),
        "ln_final.weight": np.ones(4, np.float32),
        "text_projection": np.zeros((4, 4), np.float32),
        "logit_scale": np.zeros((), np.float32),
    })
    return tensors


TINY = CLIPResNetConfig(layers=(2, 1, 2, 1), width=8, output_dim=24, head_width=32, image_size=96)


def test_tiny_resnet_matches_pytorch_reference(tmp_path):
    """Loaded from a safetensors file in the OpenAI layout with the architecture inferred from its shapes."""
    ref = reference(TINY, seed=0)
    file = tmp_path / "clip_rn.safetensors"
    save_file(openai_layout(ref), str(file))
    ours = encoders.load_clip_resnet(file, config=None, head_width=32)  # 8 heads
    assert ours.config == TINY  # layers, width, output_dim and image size read back from the shapes
    images = np.random.default_rng(1).normal(size=(2, 96, 96, 3)).astype(np.float32)
    with torch.no_grad():
        embeds, features = ref(nchw(images))
    got = nnx.jit(lambda m, x: m(x))(ours, images)
    assert got.image_embeds.shape == (2, 24)
    assert got.feature_map.shape == (2, 3, 3, 256)
    assert rel_l2(got.feature_map, features.numpy().transpose(0, 2, 3, 1)) < REL_TOL
    assert rel_l2(got.image_embeds, embeds.numpy()) < REL_TOL


def test_bare_state_dict_and_open_clip_config_load():
    """A state dict of the visual module itself (no prefix) with an open_clip config dict."""
    config = CLIPResNetConfig(layers=(1, 1, 1, 1), width=8, output_dim=16, head_width=64, image_size=64)
    ref = reference(config, seed=2)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    open_clip_config = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                                        "head_width": 64, "patch_size": None}}
    ours = encoders.load_clip_resnet(tensors, config=open_clip_config)
    assert ours.config == config and ours.config.heads == 4
    images = np.random.default_rng(3).normal(size=(1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        embeds, _ = ref(nchw(images))
    assert rel_l2(nnx.jit(lambda m, x: m(x))(ours, images).image_embeds, embeds.numpy()) < REL_TOL


def test_rn101_shapes_and_keys_match_the_reference():
    """The real RN101 config (open_clip's RN101.json) built shape-only: the same keys and shapes as the torch
    module's state dict, and the output shapes of a 224 x 224 image, without materialising any weights."""
    config = CLIPResNetConfig.from_open_clip(
        {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": [3, 4, 23, 3], "width": 64, "patch_size": None}}
    )
    assert config == CLIPResNetConfig.rn101() and config.heads == 32
    model = nnx.eval_shape(lambda: ModifiedResNet(config, rngs=nnx.Rngs(0)))
    ours = _our_torch_shapes(model)
    with torch.device("meta"):  # shapes only
        ref = TorchModifiedResNet(config.layers, config.output_dim, config.heads, config.image_size, config.width)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in theirs.values()) > 56_000_000  # RN101's image tower: ~56M values
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert out.image_embeds.shape == (2, 512)
    assert out.feature_map.shape == (2, 7, 7, 2048)


def _our_torch_shapes(model) -> dict[str, tuple]:
    """Checkpoint key -> the torch-layout shape our parameter expects."""
    shapes = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.get_value().shape)
        leaf = str(path[-1])
        if leaf == "kernel":  # (kh, kw, I, O) -> (O, I, kh, kw); (I, O) -> (O, I)
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
        shapes[".".join(str(p) for p in path[:-1]) + "." + name] = shape
    return shapes


def test_every_key_is_mapped_or_reported():
    config = CLIPResNetConfig(layers=(1, 1, 1, 1), width=8, output_dim=16, image_size=64)
    tensors = openai_layout(reference(config, seed=4))
    with pytest.raises(weights.CheckpointMismatchError, match=r"under 'visual\.'.*: extra\.weight"):
        encoders.load_clip_resnet({**tensors, "visual.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(weights.CheckpointMismatchError, match="decoder.weight"):  # neither visual nor text tower
        encoders.load_clip_resnet({**tensors, "decoder.weight": np.zeros(3, np.float32)})
    missing = {k: v for k, v in tensors.items() if not k.endswith("layer2.0.bn1.running_var")}
    with pytest.raises(weights.CheckpointMismatchError, match=r"layer2\.0\.bn1\.running_var"):
        encoders.load_clip_resnet(missing)
    with pytest.raises(weights.CheckpointMismatchError, match="attnpool.c_proj.weight"):  # wrong embedding width
        encoders.load_clip_resnet(tensors, config=CLIPResNetConfig(layers=(1, 1, 1, 1), width=8, output_dim=32,
                                                                   image_size=64))


def test_bad_config_and_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        CLIPResNetConfig(image_size=100)
    with pytest.raises(ValueError, match="layers"):
        CLIPResNetConfig(layers=(3, 4, 23))
    with pytest.raises(ValueError, match="ViT"):
        CLIPResNetConfig.from_open_clip({"embed_dim": 512, "vision_cfg": {"layers": 12, "width": 768}})
    with pytest.raises(weights.CheckpointError, match="not a file"):
        encoders.load_clip_resnet(tmp_path / "missing.safetensors")
    with pytest.raises(weights.CheckpointError, match="refusing to unpickle"):
        (tmp_path / "rn.pt").write_bytes(b"")
        encoders.load_clip_resnet(tmp_path / "rn.pt")
    model = nnx.eval_shape(lambda: ModifiedResNet(TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NHWC"):
        model(np.zeros((1, 3, 96, 96), np.float32))


def test_normalize_images_uses_clip_statistics():
    mean = np.asarray(clip_resnet.CLIP_IMAGE_MEAN, np.float32)
    out = np.asarray(clip_resnet.normalize_images(np.broadcast_to(mean, (1, 2, 2, 3))))
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    """dtype=bfloat16 (params float32, BatchNorm and softmax in float32) runs end to end; bf16 keeps ~3 significant
    digits per op, so after ~20 convolutions the embedding is ~1e-2 off (measured 1.2e-2), far below what a wrong
    computation would give (~1)."""
    tensors = openai_layout(reference(TINY, seed=5))
    full = encoders.load_clip_resnet(tensors, head_width=32)
    half = encoders.load_clip_resnet(tensors, head_width=32, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    images = np.random.default_rng(6).normal(size=(2, 96, 96, 3)).astype(np.float32)
    run = nnx.jit(lambda m, x: m(x).image_embeds)
    got = run(half, images)
    assert got.dtype == jnp.bfloat16
    assert rel_l2(got.astype(jnp.float32), run(full, images)) < 3e-2
