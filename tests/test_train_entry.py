"""train/train.py on configs/tiny.yaml: a tiny Face Fusion run (checkpoints, metrics, config), resume, early errors.

The run is a subprocess on ONE CPU device (the 8 fake devices of the test session only slow a real-model step
down); it shares JAX's persistent compilation cache with the session. `tiny_run` is shared with test_export.py
through a marker file in the session's base temp folder, so the run happens once per session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest

from fusion_jax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "configs", "tiny.yaml")
RUN_ARGS = ("train.trainable=identity", "checkpoint.every=2", "logging.every=1", "logging.progress_bar=false",
            "logging.tensorboard=false", "checkpoint.async_save=false")


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "fusion_jax_test_jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_train(workdir: str, cache: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, "train", "train.py"), "--config", TINY_YAML, f"workdir={workdir}",
           f"model.tiny_cache_dir={cache}", *RUN_ARGS, *overrides]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)


def tiny_run(base) -> dict:
    """3 steps, then resumed to 5 (once per session, also across pytest-xdist workers: under xdist the run lives in
    the session's shared temp root, and a file lock makes a second worker wait for the first's run instead of
    training it again). Returns paths and both processes' outputs."""
    import fcntl

    shared = os.path.dirname(str(base)) if os.environ.get("PYTEST_XDIST_WORKER") else str(base)
    root = os.path.join(shared, "tiny_face_fusion_run")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _tiny_run_once(root)


def _tiny_run_once(root: str) -> dict:
    marker = os.path.join(root, "done.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)
    workdir, cache = os.path.join(root, "run"), os.path.join(root, "cache")
    first = run_train(workdir, cache, "train.steps=3")
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoints_after_first = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    second = run_train(workdir, cache, "train.steps=5")
    assert second.returncode == 0, second.stderr[-4000:]
    info = {"workdir": workdir, "cache": cache, "first_stdout": first.stdout, "second_stdout": second.stdout,
            "checkpoints_after_first": checkpoints_after_first}
    with open(marker, "w") as f:
        json.dump(info, f)
    return info


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp())


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_run_writes_checkpoints_metrics_config(trained):
    workdir = trained["workdir"]
    assert trained["checkpoints_after_first"] == [2, 3]
    assert "finished at step 3" in trained["first_stdout"]
    config = load_config(os.path.join(workdir, "config.yaml"))
    assert config.objective.name == "face_fusion" and config.train.trainable == "identity"
    assert config.workdir == os.path.abspath(workdir) and config.train.steps == 5
    losses = [m["loss"] for m in _metrics(workdir) if "loss" in m]
    assert losses and all(0.0 < loss < 100.0 for loss in losses)


def test_resume_continues(trained):
    workdir = trained["workdir"]
    assert "finished at step 5 (resumed from step 3)" in trained["second_stdout"]
    steps = [m["step"] for m in _metrics(workdir) if "loss" in m]
    assert steps[-2:] == [4, 5] and steps.count(4) == 1  # the resumed run logged only steps 4 and 5
    ckpts = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert ckpts[-1] == 5


def _train_main():
    spec = importlib.util.spec_from_file_location("train_entry", os.path.join(REPO, "train", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("override, message", [
    ("model.no_such_key=1", "unknown config key 'model.no_such_key'"),
    ("data.source=imagenet", "key 'data.source': expected one of"),
    ("data.source=folder", "data.source=folder: set data.path"),
    ("model.unet_preset=huge", "model.unet_preset='huge'"),
    ("objective.name=text_to_image", "train.trainable='identity' selects Face Fusion modules"),
])
def test_bad_config_fails_before_loading(override, message, tmp_path, capsys):
    rc = _train_main()(["--config", TINY_YAML, f"workdir={tmp_path}", "train.trainable=identity",
                        f"model.tiny_cache_dir={tmp_path / 'cache'}", override])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # failed before any weights were read or written


def test_loaded_weights_are_init_arguments_not_program_constants():
    """The base weights reach the init jit as arguments: the same initial state as capturing them in the
    factory's closure, but the lowered program no longer carries them (at SD size: gigabytes of constants)."""
    import jax
    import numpy as np

    from fusion_jax import config as config_lib, experiment
    from fusion_jax.parallel import make_mesh
    from fusion_jax.training import Trainer

    cfg = config_lib.load_config(TINY_YAML, ["workdir=/tmp/unused", "mesh.data=1"])
    exp = experiment.build_experiment(cfg)
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    as_args = Trainer(exp.model_factory, exp.loss_fn, cfg.train, mesh, trainable=exp.trainable,
                      pretrained=exp.pretrained)
    as_constants = Trainer(exp.model_factory, exp.loss_fn, cfg.train, mesh, trainable=exp.trainable)
    for a, b in zip(jax.tree.leaves(as_args.init()), jax.tree.leaves(as_constants.init())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    weight_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(exp.pretrained))
    program_with_args = len(as_args._init.lower(as_args.pretrained).as_text())
    program_with_constants = len(as_constants._init.lower(None).as_text())
    assert program_with_args < weight_bytes < program_with_constants
