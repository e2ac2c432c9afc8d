"""`train.remat` reaches the UNet: every resnet / transformer block is checkpointed with the NAMED policy, and
each policy leaves the loss and the gradients unchanged.

Threading is checked on the experiment's own model (`build_experiment` on configs/tiny.yaml with the inline
tiny UNet preset, text-to-image on synthetic pre-encoded batches: the path config -> `set_remat` -> blocks ->
jax.checkpoint that training takes) by tracing its training loss, which costs no compile. Values are checked
on one cross-attention down block (resnet + transformer block, the two kinds of checkpointed call) compiled
once per policy: a whole UNet's backward pass per policy would cost minutes of XLA:CPU compile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.config import load_config
from fusion_jax.experiment import build_experiment
from fusion_jax.models.remat import REMAT_POLICIES, call_maybe_remat, remat_name
from fusion_jax.models.unet_blocks import BlockOptions, CrossAttnDownBlock2D
from fusion_jax.tiny import randomize_params
from tests.train_helpers import TINY_YAML

POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
PRESET = ("model.unet_preset=tiny", "model.latents=preencoded", "objective.name=text_to_image",
          "data.source=synthetic", "train.trainable=all", "mesh.data=1", "data.batch_size=2", "workdir=/tmp/unused")
# The tiny preset: 2 down levels (1 resnet + 1 transformer each), the mid block (2 resnets + 1 transformer)
# and 2 up levels (2 resnets + 2 transformers each): 8 resnets + 7 transformer blocks, one checkpoint each.
CHECKPOINTED_CALLS = 15
# XLA:CPU options for the block programs: LLVM level 0 halves their compile time (~9 s -> ~4 s each); every
# policy is compiled with the same options, so the comparison is unaffected.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _checkpoint_policies(jaxpr) -> list:
    """The `policy` of every checkpoint equation (`remat2`) in `jaxpr` and the jaxprs nested in its equations."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found += _checkpoint_policies(sub)
    return found


@pytest.mark.parametrize("policy", POLICIES)
def test_config_policy_reaches_every_block_checkpoint(policy):
    config = load_config(TINY_YAML, [*PRESET, f"train.remat={policy}"])
    exp = build_experiment(config)
    model = nnx.eval_shape(lambda: exp.model_factory(nnx.Rngs(0)))
    blocks = [n for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Module) and hasattr(n, "remat")]
    assert len(blocks) >= 5 and {b.remat for b in blocks} == {policy}
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                         next(exp.batch_iterator_factory(config)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, b):
        return exp.loss_fn(nnx.merge(graphdef, p, rest), b, jax.random.key(0))[0]

    # The traced training loss (forward; its gradient re-runs these checkpointed calls with the same policy).
    found = _checkpoint_policies(jax.make_jaxpr(loss)(params, batch).jaxpr)
    if policy == "none":
        assert found == []
    else:  # every checkpointed call has this policy (the policy object jax.checkpoint was given), none other
        assert len(found) == CHECKPOINTED_CALLS and all(p == REMAT_POLICIES[policy] for p in found), found


def _block(policy: str) -> CrossAttnDownBlock2D:
    opts = BlockOptions(temb_channels=16, resnet_eps=1e-5, resnet_groups=4, remat=policy)
    block = nnx.eval_shape(lambda: CrossAttnDownBlock2D(
        opts, 8, 16, num_layers=1, add_downsample=False, heads=2, cross_attention_dim=12, transformer_layers=1,
        only_cross_attention=False, name="down_blocks.0", rngs=nnx.Rngs(0)))
    return randomize_params(block, seed=5)  # host NumPy draws: the same weights for every policy


@pytest.fixture(scope="module")
def block_grads():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    ehs = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)

    def run(policy):
        graphdef, params = nnx.split(_block(policy), nnx.Param)

        def loss(p):
            h, _ = nnx.merge(graphdef, p)(x, temb, ehs)
            return jnp.mean((h - target) ** 2)

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile(FAST_COMPILE)
        value, grads = compiled(params)
        return float(value), jax.tree.map(np.asarray, grads)

    return {policy: run(policy) for policy in POLICIES}


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_policy_keeps_loss_and_gradients(policy, block_grads):
    ref_loss, ref_grads = block_grads["none"]
    loss, grads = block_grads[policy]
    # Remat re-runs the same forward ops in the backward pass; XLA may fuse the recomputation differently from
    # the stored-activation program, so results agree to float32 round-off of a few ops (~1e-7 relative) but
    # not necessarily bit for bit. Bound: 1e-5 relative on the loss and on each gradient leaf (L2, vs its norm).
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    leaves = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    assert len(leaves) == len(jax.tree.leaves(grads)) > 10
    for (path, r), g in zip(leaves, jax.tree.leaves(grads)):
        err, scale = float(np.linalg.norm(g - r)), float(np.linalg.norm(r))
        assert err <= 1e-5 * scale + 1e-12, (jax.tree_util.keystr(path), err, scale)


def test_remat_names():
    assert remat_name(True) == "dots_with_no_batch_dims_saveable" and remat_name(False) == "none"
    with pytest.raises(ValueError, match="remat='some'"):
        call_maybe_remat("some", lambda m, x: x, nnx.Linear(1, 1, rngs=nnx.Rngs(0)), jnp.ones(1))
