"""The generic torch <-> NNX converter and checkpoint file handling (fusion_jax.weights).

Reference: a small PyTorch module and an NNX module with the same tree; after conversion they must compute the
same function (float32; 1e-5 relative covers summation-order differences of a few hundred terms).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax import weights


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.proj = torch.nn.Conv2d(8, 8, 1)  # a 1x1 conv that our side implements as a Linear
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Dropout(0.0), torch.nn.Linear(8, 4)])
        self.gain = torch.nn.Parameter(torch.randn(4))

    def forward(self, x, ids):  # x NCHW
        h = self.norm(self.conv(x)) + self.embed(ids)[:, :, None, None]
        h = self.proj(h).mean(dim=(2, 3))
        return self.blocks[2](torch.relu(self.blocks[0](h))) * self.gain


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.conv = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs)
        self.norm = nnx.GroupNorm(8, num_groups=2, epsilon=1e-5, rngs=rngs)
        self.proj = nnx.Linear(8, 8, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs), nnx.Dropout(0.0), nnx.Linear(8, 4, rngs=rngs)])
        self.gain = nnx.Param(jnp.zeros((4,)))

    def __call__(self, x, ids):  # x NHWC
        h = self.norm(self.conv(x)) + self.embed(ids)[:, None, None, :]
        h = self.proj(h).mean(axis=(1, 2))
        return self.blocks[2](nnx.relu(self.blocks[0](h))) * self.gain[...]


def _torch_state():
    torch.manual_seed(0)
    net = TorchNet()
    with torch.no_grad():
        for p in net.parameters():  # randomise norms and biases too
            p.add_(torch.randn_like(p) * 0.1)
    return net, {k: v.numpy() for k, v in net.state_dict().items()}


def test_round_trip_matches_torch_outputs():
    net, tensors = _torch_state()
    model = weights.build_from_tensors(lambda: NNXNet(nnx.Rngs(0)), tensors, source="test")
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ids = np.array([1, 7])
    ref = net(torch.from_numpy(x), torch.from_numpy(ids)).detach().numpy()
    ours = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # Export restores the exact torch tensors (the 1x1 conv comes back as a Linear-shaped weight, which torch's
    # load_state_dict rejects, so compare by value after squeezing).
    back = weights.state_dict(model)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k].reshape(v.shape), v)


def test_mismatches_name_the_keys():
    _, tensors = _torch_state()
    wrong = dict(tensors)
    wrong["conv.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    wrong["extra.weight"] = np.zeros((1,), np.float32)
    del wrong["norm.bias"]
    with pytest.raises(weights.CheckpointMismatchError) as err:
        weights.build_from_tensors(lambda: NNXNet(nnx.Rngs(0)), wrong, source="bad.safetensors")
    message = str(err.value)
    for expected in ("bad.safetensors", "conv.weight", "extra.weight", "norm.bias", "(8, 3, 5, 5)"):
        assert expected in message


def test_pickles_refused_unless_allowed(tmp_path):
    _, tensors = _torch_state()
    folder = tmp_path / "component"
    folder.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "model.bin")
    with pytest.raises(weights.CheckpointError, match="refusing to unpickle"):
        weights.read_component_tensors(folder, "model")
    loaded = weights.read_component_tensors(folder, "model", allow_pickle=True)
    np.testing.assert_array_equal(loaded["conv.weight"], tensors["conv.weight"])


def test_write_and_read_component_sharded_and_hf_cache(tmp_path, monkeypatch):
    _, tensors = _torch_state()
    # Hugging Face cache layout: models--org--name/{refs/main, snapshots/<hash>/<subfolder>}
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    weights.write_component(snap / "net", {"kind": "test"}, tensors, "model.safetensors")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = weights.component_dir("org/tiny", "net")
    assert folder == snap / "net"
    assert weights.read_config(folder) == {"kind": "test"}
    np.testing.assert_array_equal(weights.read_component_tensors(folder, "model")["gain"], tensors["gain"])
    # Sharded safetensors with an index file.
    from safetensors.numpy import save_file

    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[:3]}, str(shard_dir / "model-00001.safetensors"))
    save_file({k: tensors[k] for k in keys[3:]}, str(shard_dir / "model-00002.safetensors"))
    index = {"weight_map": {k: ("model-00001.safetensors" if i < 3 else "model-00002.safetensors") for i, k in enumerate(keys)}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(weights.read_component_tensors(shard_dir, "model")) == set(tensors)


def test_truncated_file_and_unknown_repo_are_clear_errors(tmp_path, monkeypatch):
    _, tensors = _torch_state()
    weights.write_component(tmp_path / "c", {}, tensors, "model.safetensors")
    data = (tmp_path / "c" / "model.safetensors").read_bytes()
    (tmp_path / "c" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.CheckpointError, match="model.safetensors"):
        weights.read_component_tensors(tmp_path / "c", "model")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(weights.CheckpointError, match="nothing is downloaded"):
        weights.resolve_model_path("org/absent")


def test_text_and_vision_encoders_saved_by_transformers_load(tmp_path):
    """transformers 5 saves CLIPTextModel / CLIPVisionModel without the tower prefix; both layouts must load."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=12)).eval()
    text.save_pretrained(tmp_path / "text")
    ids = np.array([[49, 3, 7, 1, 0]])
    ours = weights.load_text_encoder(tmp_path / "text")
    with torch.no_grad():
        ref = text(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).last_hidden_state), ref, rtol=1e-4, atol=1e-5)

    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=8,
                                                            projection_dim=8)).eval()
    vision.save_pretrained(tmp_path / "vision")
    pixels = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ours_v = weights.load_vision_encoder(tmp_path / "vision")
    with torch.no_grad():
        ref_v = vision(torch.from_numpy(pixels)).image_embeds.numpy()
    out_v = np.asarray(ours_v(jnp.asarray(pixels.transpose(0, 2, 3, 1))).image_embeds)
    np.testing.assert_allclose(out_v, ref_v, rtol=1e-4, atol=1e-5)
