"""Multi-process training for real: 2 processes x 4 fake CPU devices (gloo collectives, localhost coordinator)
against one process with 8 fake devices.

The job is the library's train entry (`python -m fusion_jax.training --config configs/tiny.yaml ...
distributed=on`, through `tests/distributed_worker.py`, which only records the rows each process's data stream
yields) on mesh (data 1, fsdp 4, tensor 2): the fsdp axis spans both processes, so parameters and optimizer state
are sharded across them and each process writes its own shards of the checkpoint. The reference is the same
command in one process with 8 fake devices (run at the same time, as a third subprocess). Checked: losses and final params equal, the checkpoint written
by the 2 processes restores in one process onto other meshes, and the two data shards partition every global
batch (no example twice, none missed).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fusion_jax.config import MeshConfig
from fusion_jax.parallel import make_mesh, maybe_initialize_distributed, single_device_mesh
from fusion_jax.training import Trainer
from fusion_jax.training.checkpoint import Checkpointer
from fusion_jax.training.tiny import BATCH_SPEC, make_tiny_model, tiny_loss
from tests.train_helpers import REPO, TINY_YAML, leaves_with_paths, tiny_config

STEPS = 5
RUN = (f"train.steps={STEPS}", "logging.every=1", f"checkpoint.every={STEPS}", "checkpoint.async_save=false",
       "logging.progress_bar=false", "logging.tensorboard=false", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")

# Tolerances. The two runs compute the same per-device partial results; they differ only in how the partial
# gradient sums are combined (gloo across 2 processes vs. XLA's in-process all-reduce over 8 devices), i.e. a
# re-association of an 8-term float32 sum: relative error <= ~8 * 2**-24 ~ 5e-7 in each gradient. Clipping and
# Adam (update ~ lr * m / sqrt(v), a ratio insensitive to a common relative error) pass that on as relative
# error of the same order in each of the 5 updates of size <= lr = 1e-3, so params may differ by ~1e-9 in
# absolute terms and losses by a few float32 ulps (measured: losses within 1 ulp, 1.2e-7). Bounds: losses
# rtol 1e-6 (~8 ulps at 1.3); params atol 1e-6 (0.02% of the largest possible total update 5 * lr).
LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [m for m in (json.loads(line) for line in f if line.strip()) if "loss" in m]


# Compile flags of all three processes: LLVM's optimisation level 0 halves the XLA:CPU compile time of this
# tiny step (the dominant cost of the test). Every process compiles with the same flags, so the comparison
# is unaffected; the partitioned per-device program is the same on the 4- and 8-device hosts.
COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def _launch(out: str, workdir: str, devices: int, distributed: dict) -> subprocess.Popen:
    env = dict(os.environ)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update({
        "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}", *COMPILE_FLAGS]),
        "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",  # the session's (conftest)
        **distributed,
    })
    cmd = [sys.executable, "-m", "tests.distributed_worker", out, "--config", TINY_YAML, f"workdir={workdir}", *RUN]
    if distributed:
        cmd.append("distributed=on")
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launches the 2-process job and the 1-process reference (all three at once); returns their folders."""
    two, one = str(tmp_path_factory.mktemp("two_process")), str(tmp_path_factory.mktemp("one_process"))
    port = _free_port()
    procs = [_launch(two, os.path.join(two, "run"), 4, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                                        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    procs.append(_launch(one, os.path.join(one, "run"), 8, {}))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for name, p, text in zip(("process 0", "process 1", "reference"), procs, outputs):
        assert p.returncode == 0, f"{name} failed:\n{text[-4000:]}"
        assert f"finished at step {STEPS}" in text, text[-2000:]
    return {"two": two, "one": one}


def _restore(workdir: str, mesh):
    trainer = Trainer(make_tiny_model, tiny_loss, tiny_config(*RUN).train, mesh)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), tiny_config(*RUN).checkpoint)
    try:
        return checkpointer.restore(trainer.abstract_state_for(mesh))
    finally:
        checkpointer.close()


def test_two_processes_match_one_process(runs):
    workdir, ref_workdir = os.path.join(runs["two"], "run"), os.path.join(runs["one"], "run")
    losses = [m["loss"] for m in _metrics(workdir)]
    ref_losses = [m["loss"] for m in _metrics(ref_workdir)]
    assert len(losses) == len(ref_losses) == STEPS
    print("max loss difference", np.max(np.abs(np.subtract(losses, ref_losses))))
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, atol=0)

    # The 2-process checkpoint restored in this single process, on another mesh and on one device.
    ref_state, _, _ = _restore(ref_workdir, single_device_mesh())
    expected = leaves_with_paths(ref_state)
    for mesh in (make_mesh(MeshConfig(2, 2, 2)), single_device_mesh()):
        state, data_state, config = _restore(workdir, mesh)
        assert data_state == {"index": STEPS} and config["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
        for leaf in jax.tree.leaves(state):
            assert leaf.sharding.mesh.devices.size == mesh.devices.size
        got = leaves_with_paths(state)
        assert got.keys() == expected.keys()
        worst = max(float(np.max(np.abs(got[k].astype(np.float64) - expected[k]))) for k in got)
        print("max state difference", worst)
        for path in got:
            np.testing.assert_allclose(got[path], expected[path], rtol=0, atol=PARAM_ATOL, err_msg=path)
        assert int(state.step) == STEPS


def test_sharded_across_processes():
    """fsdp spans the processes: some parameter really is split between them (each process wrote its part)."""
    mesh = make_mesh(MeshConfig(1, 4, 2))
    trainer = Trainer(make_tiny_model, tiny_loss, tiny_config(*RUN).train, mesh)
    specs = [s.spec for s in jax.tree.leaves(trainer.state_shardings.params)]
    assert any("fsdp" in [a for a in spec if a] for spec in specs)


def test_each_process_reads_its_own_shard(runs):
    ref_rows = np.load(os.path.join(runs["one"], "rows_0.npz"))["x"]  # (steps, 8, ...): one process's batches
    shards = [np.load(os.path.join(runs["two"], f"rows_{p}.npz"))["x"] for p in range(2)]
    assert shards[0].shape == shards[1].shape == (STEPS, 4) + BATCH_SPEC["x"]
    # The global batch of every step is exactly the two shards in process order: none missed, none twice
    # (the rows are continuous random draws, so equal rows would mean a repeated example).
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), ref_rows)
    flat = np.concatenate([s.reshape(-1, s[0, 0].size) for s in shards])
    assert len(np.unique(flat, axis=0)) == len(flat) == STEPS * 8


def test_initialising_too_late_names_the_fix():
    """After the backend exists (as in this test process), asking for distributed init is a clear error."""
    jax.devices()
    with pytest.raises(RuntimeError, match="maybe_initialize_distributed.*before building the experiment"):
        maybe_initialize_distributed("on")
