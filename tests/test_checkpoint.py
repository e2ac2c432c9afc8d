"""Checkpoints: exact resume after SIGTERM and SIGKILL, interrupted saves, restore onto other meshes."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fusion_jax.config import CheckpointConfig, MeshConfig, TrainConfig
from fusion_jax.parallel import make_mesh, shard_batch, single_device_mesh
from fusion_jax.training import Trainer
from fusion_jax.training.checkpoint import Checkpointer
from fusion_jax.training.loop import train
from fusion_jax.training.metrics import latest_metric_step, read_metrics
from fusion_jax.training.synthetic import SyntheticBatches
from fusion_jax.training.tiny import BATCH_SPEC, make_tiny_model, tiny_loss
from tests.train_helpers import REPO, assert_trees_equal, host, tiny_batches, tiny_config

# One run definition shared by the reference and the interrupted runs: 12 steps on mesh (2,2,2), a
# checkpoint every 4 steps, EMA on, metrics every step.
RUN = ("train.steps=12", "checkpoint.every=4", "logging.every=1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
       "logging.tensorboard=true")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final state (host copy) and workdir."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = train(tiny_config(*RUN), make_tiny_model, tiny_loss, tiny_batches, workdir)
    assert result.step == 12 and not result.preempted and result.resumed_from is None
    return host(result.state), workdir


def _resume(workdir):
    result = train(tiny_config(*RUN), make_tiny_model, tiny_loss, tiny_batches, workdir)
    return result, host(result.state)


def test_run_writes_config_metrics_and_tensorboard(reference):
    _, workdir = reference
    from fusion_jax.config import load_config

    assert load_config(os.path.join(workdir, "config.yaml")) == tiny_config(*RUN, f"workdir={workdir}")
    records = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "skipped_steps", "aux/pred_rms"):
        assert all(np.isfinite(r[key]) for r in records), key
    for key in ("examples_per_s", "step_time_s"):
        assert all(r[key] > 0 for r in records[1:]), key
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))


def test_sigterm_saves_and_resume_is_bit_exact(reference, tmp_path):
    ref_state, ref_workdir = reference
    workdir = str(tmp_path)

    def send_sigterm_at_step_6(model, step, workdir):  # the sample hook runs after steps 2, 4, 6, ...
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config(*RUN, "logging.sample_every=2")
    result = train(config, make_tiny_model, tiny_loss, tiny_batches, workdir, sample_fn=send_sigterm_at_step_6)
    assert result.preempted and result.step == 6
    assert Checkpointer(os.path.join(workdir, "checkpoints"), CheckpointConfig()).all_steps() == [4, 6]
    resumed, state = _resume(workdir)
    assert resumed.resumed_from == 6 and resumed.step == 12
    assert_trees_equal(state, ref_state)
    # Metrics of the resumed part continue the same curve as the reference run.
    ref_losses = {r["step"]: r["loss"] for r in read_metrics(ref_workdir) if "loss" in r}
    for r in read_metrics(workdir):
        if "loss" in r and r["step"] > 6:
            assert r["loss"] == ref_losses[r["step"]]


def test_sigkill_mid_run_then_resume_is_bit_exact(reference, tmp_path):
    ref_state, _ = reference
    workdir = str(tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    # 0.3 s per batch: the run is slow enough to be killed between the checkpoints at steps 4 and 8.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.train_helpers", "0.3", f"workdir={workdir}", *RUN],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 240
    try:
        # Kill after the step-4 checkpoint, preferably while the step-8 save is being written (its Orbax
        # temporary directory exists), at the latest once step 10 is logged.
        while time.time() < deadline and proc.poll() is None:
            step = latest_metric_step(workdir) or 0
            saving = glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*"))
            if step >= 6 and os.path.isdir(os.path.join(ckpt_dir, "4")) and (saving or step >= 10):
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_mid_save = bool(glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*")))
    print(f"killed mid-save: {killed_mid_save}")  # usually True; either way nothing half-written is used
    killed_at = latest_metric_step(workdir)
    assert 6 <= killed_at < 12

    # Every step the manager lists restores; unfinished saves are not listed.
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), CheckpointConfig())
    steps = checkpointer.all_steps()
    assert 4 in steps and max(steps) < 12
    trainer = Trainer(make_tiny_model, tiny_loss, tiny_config(*RUN).train, make_mesh(MeshConfig(2, 2, 2)))
    for step in steps:
        state, data_state, config = checkpointer.restore(trainer.abstract_state_for(trainer.mesh), step)
        assert int(state.step) == step and data_state == {"index": step}
        assert config["train"]["steps"] == 12
    checkpointer.close()

    resumed, state = _resume(workdir)
    assert resumed.resumed_from == max(steps)
    assert_trees_equal(state, ref_state)


def test_interrupted_save_is_never_picked_up(reference, tmp_path):
    """A save killed before Orbax's final rename leaves only a tmp directory: ignored, then cleaned up."""
    _, ref_workdir = reference
    ckpt_dir = str(tmp_path / "checkpoints")
    os.makedirs(ckpt_dir)
    # Copy the real step-8 checkpoint, and a truncated copy of step 12 under Orbax's temporary name.
    subprocess.run(["cp", "-r", os.path.join(ref_workdir, "checkpoints", "8"), ckpt_dir], check=True)
    partial = os.path.join(ckpt_dir, "12.orbax-checkpoint-tmp-1700000000")
    subprocess.run(["cp", "-r", os.path.join(ref_workdir, "checkpoints", "12"), partial], check=True)
    for path in glob.glob(os.path.join(partial, "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 2, 0))
    checkpointer = Checkpointer(ckpt_dir, CheckpointConfig())
    assert checkpointer.all_steps() == [8] and checkpointer.latest_step() == 8
    trainer = Trainer(make_tiny_model, tiny_loss, tiny_config(*RUN).train, make_mesh(MeshConfig(2, 2, 2)))
    state, data_state, _ = checkpointer.restore(trainer.abstract_state_for(trainer.mesh))
    assert int(state.step) == 8 and data_state == {"index": 8}
    checkpointer.close()


def test_checkpoint_from_2x2x2_restores_on_8x1x1_and_one_device(tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, warmup_steps=0, ema_decay=0.9)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    trainer = Trainer(make_tiny_model, tiny_loss, cfg, mesh)
    state = trainer.init()
    batches = SyntheticBatches(BATCH_SPEC, 8, seed=0)
    for _ in range(2):
        state, _ = trainer.step(state, shard_batch(next(batches), mesh))
    assert any(len(set(x.sharding.spec) - {None}) > 0 for x in jax.tree.leaves(state.params))  # really sharded
    saved = host(state)
    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig(async_save=True))
    checkpointer.save(2, state, batches.get_state(), {"note": "2x2x2"})
    checkpointer.wait()
    for target in (make_mesh(MeshConfig(8, 1, 1)), single_device_mesh()):
        restored, data_state, config = checkpointer.restore(trainer.abstract_state_for(target))
        assert_trees_equal(restored, saved)
        assert data_state == {"index": 2} and config == {"note": "2x2x2"}
        for leaf in jax.tree.leaves(restored):
            assert leaf.sharding.mesh.devices.size == target.devices.size
    checkpointer.close()


def test_retention_keeps_last_k_and_every_mth(tmp_path):
    mesh = single_device_mesh()
    trainer = Trainer(make_tiny_model, tiny_loss, TrainConfig(steps=10), mesh)
    state = trainer.init()
    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig(keep_last=2, keep_every=4, async_save=False))
    for step in range(1, 11):
        checkpointer.save(step, state, {"index": step}, {})
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 8, 9, 10]
    checkpointer.close()
