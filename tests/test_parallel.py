"""Mesh construction and the logical-axis sharding rules, on 8 fake CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from fusion_jax.config import ConfigError, MeshConfig
from fusion_jax.parallel import (
    check_batch_size,
    describe_shardings,
    distributed_requested,
    logical_axes_for_param,
    make_mesh,
    param_spec,
    resolve_mesh_shape,
    shard_batch,
    tree_shardings,
)


def test_resolve_mesh_shape_fills_minus_one():
    assert resolve_mesh_shape(MeshConfig(-1, 2, 2), 8) == (2, 2, 2)
    assert resolve_mesh_shape(MeshConfig(8, 1, 1), 8) == (8, 1, 1)
    assert resolve_mesh_shape(MeshConfig(1, -1, 4), 8) == (1, 2, 4)


@pytest.mark.parametrize(
    "mesh, message",
    [
        (MeshConfig(3, 1, 1), "mesh (mesh.data=3, mesh.fsdp=1, mesh.tensor=1) has 3 devices but 8 are available"),
        (MeshConfig(-1, 3, 1), "multiply to 3, which does not divide the 8 available devices"),
        (MeshConfig(-1, -1, 1), "at most one axis may be -1"),
        (MeshConfig(0, 8, 1), "mesh.data=0: sizes must be positive"),
    ],
)
def test_bad_mesh_fails_before_compiling(mesh, message):
    # make_mesh validates sizes before it touches jax: nothing is traced or compiled.
    with pytest.raises(ConfigError) as e:
        make_mesh(mesh)
    assert message in str(e.value)


def test_make_mesh_axes_are_auto():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


UNET_CASES = [
    # path (diffusers names, nnx kernel layouts), shape, expected spec on mesh (data=1, fsdp=2, tensor=4)
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel", (768, 640), P("fsdp", "tensor")),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.kernel", (640, 640), P("fsdp", "tensor")),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k_ref.kernel", (1280, 1280), P("fsdp", "tensor")),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.kernel", (320, 320), P("tensor", "fsdp")),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0.bias", (320,), P()),
    ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.kernel", (320, 2560), P("fsdp", "tensor")),
    ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.kernel", (1280, 320), P("tensor", "fsdp")),
    ("down_blocks.0.attentions.0.transformer_blocks.0.norm1.scale", (320,), P()),
    ("down_blocks.0.resnets.0.conv1.kernel", (3, 3, 320, 320), P(None, None, None, "fsdp")),
    ("down_blocks.0.resnets.0.time_emb_proj.kernel", (1280, 320), P("fsdp")),
    ("down_blocks.0.attentions.0.proj_in.kernel", (1, 1, 320, 320), P(None, None, None, "fsdp")),
    ("time_embedding.linear_1.kernel", (320, 1280), P("fsdp", "tensor")),
    ("time_embedding.linear_2.kernel", (1280, 1280), P("tensor", "fsdp")),
    ("conv_in.kernel", (3, 3, 4, 320), P(None, None, None, "fsdp")),
    ("conv_out.kernel", (3, 3, 320, 4), P(None, None, None, "fsdp")),
    # Dims the mesh axis does not divide fall back to replicated for that dim only.
    ("conv_out.kernel", (3, 3, 320, 3), P()),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel", (77, 320), P(None, "tensor")),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel", (768, 6), P("fsdp")),
]


@pytest.mark.parametrize("path, shape, expected", UNET_CASES)
def test_param_rules_for_unet_paths(path, shape, expected):
    mesh = make_mesh(MeshConfig(1, 2, 4))
    assert param_spec(path, shape, mesh) == expected


def test_rules_need_matching_rank():
    # A 2-D rule never applies to a 4-D kernel of the same name and vice versa.
    assert logical_axes_for_param("x.attn1.to_q.kernel", 2) == ("embed", "heads")
    assert logical_axes_for_param("x.attn1.to_q.kernel", 4) == (None, None, "conv_in", "conv_out")
    assert logical_axes_for_param("x.something.weird", 3) == (None, None, None)


def test_optimizer_state_gets_its_params_sharding():
    mesh = make_mesh(MeshConfig(1, 2, 4))
    kernel = jax.ShapeDtypeStruct((64, 32), np.float32)
    tree = {
        "params": {"attn1": {"to_q": {"kernel": kernel}}},
        "opt_state": [{"mu": {"attn1": {"to_q": {"kernel": kernel}}}, "count": jax.ShapeDtypeStruct((), np.int32)}],
    }
    shardings = tree_shardings(tree, mesh)
    assert shardings["params"]["attn1"]["to_q"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["opt_state"][0]["mu"]["attn1"]["to_q"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["opt_state"][0]["count"].spec == P()
    assert [d[0] for d in describe_shardings(tree, mesh)][0] == "opt_state.0.count"


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
    sharded = shard_batch(batch, mesh)["x"]
    np.testing.assert_array_equal(np.asarray(sharded), batch["x"])
    # 4 batch shards of 2 rows, each held by the 2 devices of the tensor axis.
    rows = {tuple(np.asarray(s.data)[:, 0]) for s in sharded.addressable_shards}
    assert rows == {(0.0, 3.0), (6.0, 9.0), (12.0, 15.0), (18.0, 21.0)}


def test_check_batch_size_names_the_key():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    check_batch_size(8, mesh, 2)
    with pytest.raises(ConfigError, match=r"data.batch_size=6 must be a multiple of .* = 4 x 1 = 4"):
        check_batch_size(6, mesh, 1)
    with pytest.raises(ConfigError, match="train.grad_accum"):
        check_batch_size(8, mesh, 4)


def test_distributed_requested_only_when_the_environment_asks():
    assert not distributed_requested("auto", {})
    assert distributed_requested("on", {})
    assert not distributed_requested("off", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert distributed_requested("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert distributed_requested("auto", {"SLURM_NTASKS": "16"})
    assert not distributed_requested("auto", {"SLURM_NTASKS": "1"})
    assert not distributed_requested("auto", {"TPU_WORKER_HOSTNAMES": "localhost"})  # single-host TPU VM
    assert distributed_requested("auto", {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"})
