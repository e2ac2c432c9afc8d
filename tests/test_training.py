"""The sharded train step: mesh equivalence, NaN skipping, trainable selection, accumulation, EMA, precision."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.config import ConfigError, MeshConfig, TrainConfig
from fusion_jax.parallel import make_mesh, shard_batch, single_device_mesh
from fusion_jax.training import Trainer
from fusion_jax.training.loop import train
from fusion_jax.training.synthetic import SyntheticBatches
from fusion_jax.training.tiny import BATCH_SPEC, make_tiny_model, tiny_loss
from tests.train_helpers import FaultyBatches, host, leaves_with_paths, tiny_config

# lr 1e-2: one Adam step moves each param by ~1e-2, far above the tolerances used below.
CFG = TrainConfig(steps=5, lr=1e-2, warmup_steps=0, cosine=False, weight_decay=1e-2, ema_decay=0.5)


def _run(cfg: TrainConfig, mesh, steps=5, batches=None, loss=tiny_loss, trainer=None):
    trainer = trainer or Trainer(make_tiny_model, loss, cfg, mesh)
    state = trainer.init()
    batches = batches or SyntheticBatches(BATCH_SPEC, 16, seed=0)
    metrics = []
    for _ in range(steps):
        state, m = trainer.step(state, shard_batch(next(batches), mesh))
        metrics.append(m)
    return host(metrics), host(state)


def test_sharded_meshes_match_one_device():
    cfg = dataclasses.replace(CFG, grad_accum=2)
    ref_metrics, ref_state = _run(cfg, single_device_mesh())
    ref_losses = np.array([m["loss"] for m in ref_metrics])
    assert np.all(np.diff(ref_losses) != 0)  # the losses change: the comparison is not of constants
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        metrics, state = _run(cfg, make_mesh(MeshConfig(*shape)))
        # Sharding only changes the order of float32 sums (batch means, matmul contractions split over
        # fsdp/tensor, all-reduces): each differs by a few ulps (~1e-7 relative). Over 5 Adam steps this
        # stays below 1e-6 (measured <= 2.4e-7); a real sharding bug (a missing all-reduce, a wrong
        # slice) changes losses by >1e-3 and params by about lr=1e-2.
        np.testing.assert_allclose([m["loss"] for m in metrics], ref_losses, rtol=2e-6, atol=0, err_msg=str(shape))
        for name in ("params", "ema", "opt_state"):
            got, want = leaves_with_paths(getattr(state, name)), leaves_with_paths(getattr(ref_state, name))
            for path in want:
                np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=2e-6, err_msg=f"{shape} {path}")
        assert int(state.step) == 5 and int(state.skipped) == 0


def test_nan_batch_is_skipped_and_counted():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    trainer = Trainer(make_tiny_model, tiny_loss, CFG, mesh)
    batches = FaultyBatches(16, nan_index=2)
    state = trainer.init()
    snapshots, metrics = [], []
    for _ in range(5):
        state, m = trainer.step(state, shard_batch(next(batches), mesh))
        snapshots.append(host((state.params, state.opt_state, state.ema)))
        metrics.append(host(m))
    assert [int(m["finite"]) for m in metrics] == [1, 1, 0, 1, 1]
    assert [int(m["skipped_steps"]) for m in metrics] == [0, 0, 1, 1, 1]
    assert not np.isfinite(metrics[2]["loss"])
    # The NaN step leaves params, optimizer state and EMA bit-for-bit unchanged...
    for before, after in zip(jax.tree.leaves(snapshots[1]), jax.tree.leaves(snapshots[2])):
        np.testing.assert_array_equal(before, after)
    # ...and training continues: the next step moves the params, and everything stays finite.
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(snapshots[2][0]), jax.tree.leaves(snapshots[3][0])))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(snapshots[-1]))
    assert int(state.step) == 5 and int(state.skipped) == 1


def test_loop_stops_when_too_many_steps_are_skipped(tmp_path):
    config = tiny_config("train.steps=6", "train.max_skipped_steps=0", "logging.every=1", "checkpoint.every=0")
    with pytest.raises(FloatingPointError, match=r"1 steps had a non-finite loss .*max_skipped_steps=0"):
        train(config, make_tiny_model, tiny_loss, lambda c: FaultyBatches(8, nan_index=1), str(tmp_path))


def test_only_selected_params_train():
    cfg = dataclasses.replace(CFG, trainable=r"attn1\.to_(q|k)", ema_decay=None)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    trainer = Trainer(make_tiny_model, tiny_loss, cfg, mesh)
    start = host(trainer.init())
    _, end = _run(cfg, mesh, steps=2, trainer=trainer)
    trained = leaves_with_paths(end.params)
    assert sorted(p.rsplit(".", 2)[-2] for p in trained) == ["to_k", "to_q"]
    # Adam moments exist only for the selected params (two per param: mu and nu).
    opt_paths = [p for p in leaves_with_paths(end.opt_state) if p.endswith("kernel")]
    assert len(opt_paths) == 4 and all("to_q" in p or "to_k" in p for p in opt_paths)
    for path, value in leaves_with_paths(end.frozen).items():
        np.testing.assert_array_equal(value, leaves_with_paths(start.frozen)[path], err_msg=path)
    for path, value in trained.items():
        assert np.any(value != leaves_with_paths(start.params)[path]), path
    with pytest.raises(ConfigError, match="selects no parameters"):
        Trainer(make_tiny_model, tiny_loss, dataclasses.replace(cfg, trainable="no_such_layer"), mesh)


def _loss_without_rng(model, batch, rng):
    del rng
    pred = model(batch["x"])
    return jnp.mean((pred - batch["target"]) ** 2), {}


def test_grad_accumulation_equals_the_full_batch():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    cfg = dataclasses.replace(CFG, ema_decay=None)
    m1, s1 = _run(cfg, mesh, steps=3, loss=_loss_without_rng)
    m4, s4 = _run(dataclasses.replace(cfg, grad_accum=4), mesh, steps=3, loss=_loss_without_rng)
    # The loss is a mean over equal-sized micro-batches, so the mean of micro-batch gradients is the
    # full-batch gradient; only the float32 summation order differs (~1e-7 relative).
    np.testing.assert_allclose([m["loss"] for m in m4], [m["loss"] for m in m1], rtol=2e-6)
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_ema_lr_schedule_and_clipping_follow_their_formulas():
    cfg = dataclasses.replace(CFG, lr=0.1, warmup_steps=4, cosine=True, steps=10, ema_decay=0.75, clip_norm=1e-3)
    mesh = single_device_mesh()
    trainer = Trainer(make_tiny_model, tiny_loss, cfg, mesh)
    state = trainer.init()
    p0 = host(state.params)
    batches = SyntheticBatches(BATCH_SPEC, 16, seed=0)
    lrs = []
    for _ in range(6):
        state, m = trainer.step(state, shard_batch(next(batches), mesh))
        lrs.append(float(m["lr"]))
        if len(lrs) == 2:
            p2, ema2 = host(state.params), host(state.ema)
        if len(lrs) == 1:
            p1 = host(state.params)
    # Warmup: lr(i) = 0.1 * i / 4 for update i = 0..3; then cosine over the remaining 6 steps.
    want = [0.1 * i / 4 for i in range(4)] + [0.05 * (1 + np.cos(np.pi * i / 6)) for i in range(2)]
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    # EMA (decay d) starts at the initial params: ema2 = d^2 p0 + d(1-d) p1 + (1-d) p2.
    d = 0.75
    for path, e in leaves_with_paths(ema2).items():
        ref = d * d * leaves_with_paths(p0)[path] + d * (1 - d) * leaves_with_paths(p1)[path]
        ref += (1 - d) * leaves_with_paths(p2)[path]
        np.testing.assert_allclose(e, ref, rtol=1e-6, atol=1e-7, err_msg=path)
    assert float(m["grad_norm"]) > 1e-3  # reported before clipping: clipping was active


def test_bf16_compute_keeps_float32_master_weights():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    m32, s32 = _run(CFG, mesh, steps=2)
    m16, s16 = _run(dataclasses.replace(CFG, compute_dtype="bfloat16"), mesh, steps=2)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.params))
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3 per op); a few chained matmuls stay within 3%.
    np.testing.assert_allclose([m["loss"] for m in m16], [m["loss"] for m in m32], rtol=3e-2)
    assert any(float(a["loss"]) != float(b["loss"]) for a, b in zip(m16, m32))  # bf16 was really used


def test_bad_mesh_or_batch_fails_in_train_before_anything_is_traced(tmp_path):
    def model_factory_must_not_run(rngs):
        raise AssertionError("the model was traced: the config error came too late")

    for override, message in [
        ("mesh.data=3", "has 3 devices but 8 are available"),
        ("data.batch_size=12", "data.batch_size=12 must be a multiple of"),
        ("workdir=", "workdir: must be set"),
    ]:
        config = tiny_config(override)
        with pytest.raises(ConfigError, match=message):
            train(config, model_factory_must_not_run, tiny_loss, lambda c: None, None if override == "workdir=" else str(tmp_path))


@pytest.mark.parametrize("name", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_keep_values_and_gradients(name):
    from fusion_jax.training import maybe_remat, remat_policy

    w = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)), jnp.float32)
    block = lambda x: jnp.tanh(x @ w) @ w  # noqa: E731
    loss = lambda f: lambda x: jnp.sum(f(x) ** 2)  # noqa: E731
    x = jnp.ones((2, 4))
    remat_grad = jax.grad(loss(maybe_remat(block, name)))(x)
    # Remat only changes what is stored for the backward pass, never the math: same ops, same order.
    np.testing.assert_array_equal(remat_grad, jax.grad(loss(block))(x))
    jaxpr = jax.make_jaxpr(loss(maybe_remat(block, name)))(x).jaxpr
    assert [e.params["policy"] for e in jaxpr.eqns if "policy" in e.params] == [remat_policy(name)]
    with pytest.raises(ConfigError, match="train.remat='some'"):
        maybe_remat(block, "some")


def test_host_only_fields_are_dropped_before_sharding():
    from fusion_jax.training.loop import device_fields

    batch = {"x": np.zeros((2, 3), np.float32), "ids": np.zeros((2,), np.int32), "caption": np.array(["a", "b"])}
    assert sorted(device_fields(batch)) == ["ids", "x"]
