"""The built wheel, installed non-editable into a fresh venv, runs `fusion-jax` from a folder outside the checkout.

What a user of `pip install fusion-jax` gets: the console script, every subcommand's module, and the configs as
package data (`--config tiny` must not need the source tree). The venv sees the system's site-packages (jax, torch,
... are not downloaded) but its own site-packages come first, so `fusion_jax` is the wheel's copy; the test checks
that (`fusion_jax.__file__`) instead of assuming it. The references: the repository's own `configs/` files (the
wheel's copies must be byte-identical, and the installed `train` must resolve to the same config as the checkout's
loader on `configs/tiny.yaml`), the PNG settings the checkout's `cli_utils.read_png_settings` reads back, and the
checkout's own stage configs of the quickstart.

Cost: the wheel build + venv take seconds; `generate` and `train` compile the same programs as test_sampling.py and
test_train_entry.py (same shapes, same XLA flags, the session's persistent compilation cache, whose key leaves
source locations out), so this file is named to run after them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion_jax import cli_utils
from fusion_jax.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "fusion_jax", "configs")
COMMANDS = ("generate", "train", "export", "build-dataset", "preencode", "quickstart", "evaluate", "reproduce", "demo")
TRAIN_ARGS = ("train.trainable=identity", "checkpoint.every=2", "logging.every=1", "logging.progress_bar=false",
              "logging.tensorboard=false", "checkpoint.async_save=false", "train.steps=3")  # = test_train_entry's first run



def _run(cmd, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def test_dispatcher_refuses_a_command_whose_module_is_missing(monkeypatch, capsys):
    """`reproduce` / `demo` landed after the dispatcher: an absent module is a clear refusal, not a traceback."""
    import fusion_jax.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "later", ("no_such_module_yet", "a command announced before its code"))
    assert cli.main(["later", "--help"]) == 2
    assert "fusion-jax later: not available in this version" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2 and "did you mean 'train'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"\n  {command} " in listed for command in COMMANDS)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, env for its processes, a working folder outside the repository)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # build from a copy: pip's in-tree build would leave build/ in the shared checkout
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", src],
         cwd=root, env=clean)
    (wheel,) = (root / "dist").glob("fusion_jax-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=root, env=clean)
    python = venv / "bin" / "python"
    # pip comes from the system site-packages; --ignore-installed: the editable checkout install there stays as it is
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed", wheel],
         cwd=root, env=clean)
    work = root / "elsewhere"
    work.mkdir()
    env = dict(clean, PATH=f"{venv / 'bin'}{os.pathsep}{clean.get('PATH', '')}", JAX_PLATFORMS="cpu",
               XDG_CACHE_HOME=str(root / "cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "fusion_jax_test_jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return venv / "bin", env, work


@pytest.mark.slow
def test_wheel_is_what_runs_and_ships_the_configs(installed):
    bin_dir, env, work = installed
    probe = ("import json, fusion_jax, fusion_jax.cli\n"
             "from fusion_jax.config_files import resolve_config, shipped_config_dir, shipped_configs\n"
             "print(json.dumps({'package': fusion_jax.__file__, 'dir': str(shipped_config_dir()),"
             " 'names': shipped_configs(), 'tiny': resolve_config('tiny'),"
             " 'prefixed': resolve_config('configs/synthfaces/face_fusion.yaml')}))")
    info = json.loads(_run([bin_dir / "python", "-c", probe], cwd=work, env=env).stdout)
    site = Path(info["package"]).resolve().parents[1]
    assert site.is_relative_to(bin_dir.parent.resolve()), info  # the venv's copy, not the checkout
    assert not Path(info["package"]).resolve().is_relative_to(REPO)
    shipped = Path(info["dir"])
    assert shipped == site / "fusion_jax" / "configs"
    expected = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml"))
    assert info["names"] == expected
    for path in (REPO / "configs").rglob("*.yaml"):  # byte-identical copies of the checkout's files
        assert (shipped / path.relative_to(REPO / "configs")).read_bytes() == path.read_bytes(), path
    assert info["tiny"] == str(shipped / "tiny.yaml")
    assert info["prefixed"] == str(shipped / "synthfaces" / "face_fusion.yaml")

    text = _run([bin_dir / "fusion-jax", "--help"], cwd=work, env=env).stdout
    for command in COMMANDS:
        assert f"\n  {command} " in text, command
    bad = subprocess.run([bin_dir / "fusion-jax", "trian"], cwd=work, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'train'" in bad.stderr


@pytest.mark.slow
def test_quickstart_stages_find_their_configs(installed, tmp_path):
    """The quickstart's stage configs (configs/synthfaces/*.yaml, found through the package, no checkout) from the
    wheel equal the checkout's loader on the repository's files. The full `fusion-jax quickstart --fast` run is not
    repeated here: it costs about 150 s of CPU even with a warm compilation cache (tests/test_quickstart.py runs
    the same program from the checkout)."""
    bin_dir, env, work = installed
    help_text = _run([bin_dir / "fusion-jax", "quickstart", "--help"], cwd=work, env=env).stdout
    assert "--fast" in help_text and "usage: fusion-jax quickstart" in help_text
    probe = ("import json, sys\nfrom fusion_jax.config import to_dict\nfrom fusion_jax.miniature import stage_configs\n"
             "base, fusion, model = stage_configs(sys.argv[1], 4, 4, 8, (8, 16))\n"
             "print(json.dumps([to_dict(base), to_dict(fusion)], default=str))")
    out = str(tmp_path / "qs")
    ours = json.loads(_run([bin_dir / "python", "-c", probe, out], cwd=work, env=env).stdout.splitlines()[-1])
    from fusion_jax.miniature import stage_configs

    base, fusion, _ = stage_configs(out, 4, 4, 8, (8, 16), config_dir=str(REPO / "configs" / "synthfaces"))
    assert ours == json.loads(json.dumps([to_dict(base), to_dict(fusion)], default=str))


@pytest.mark.slow
def test_generate_tiny(installed):
    bin_dir, env, work = installed
    _run([bin_dir / "fusion-jax", "generate", "--model", "tiny", "--prompt", "a smiling person", "--steps", "1",
          "--batch-size", "2", "--num-images", "2", "--out", "gen"], cwd=work, env=env)
    pngs = sorted((work / "gen").glob("0*.png"))
    assert len(pngs) == 2 and (work / "gen" / "grid.png").is_file()
    settings = cli_utils.read_png_settings(pngs[1])  # the checkout's reader on the wheel's files
    assert settings["prompt"] == "a smiling person" and settings["sampling"]["num_steps"] == 1
    assert settings["model"] == "tiny" and settings["image_in_batch"] == 1
    # --model tiny wrote the tiny pipeline under the venv's XDG_CACHE_HOME, not into the user's cache
    assert (Path(env["XDG_CACHE_HOME"]) / "fusion_jax" / "tiny_pipeline").is_dir()
    image = np.asarray(Image.open(pngs[0]))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0


@pytest.mark.slow
def test_train_tiny_by_name(installed):
    bin_dir, env, work = installed
    env = dict(env, XLA_FLAGS=" ".join(f for f in env.get("XLA_FLAGS", "").split()
                                       if "xla_force_host_platform_device_count" not in f))  # one device
    result = _run([bin_dir / "fusion-jax", "train", "--config", "tiny", "workdir=run",
                   f"model.tiny_cache_dir={work / 'tiny_cache'}", *TRAIN_ARGS], cwd=work, env=env)
    assert "finished at step 3" in result.stdout
    assert sorted(s for s in os.listdir(work / "run" / "checkpoints") if s.isdigit()) == ["2", "3"]
    # the installed command resolved `tiny` to the same config as the checkout's loader on configs/tiny.yaml
    ours = load_config(str(work / "run" / "config.yaml"))
    reference = load_config(str(REPO / "configs" / "tiny.yaml"),
                            [f"workdir={work / 'run'}", f"model.tiny_cache_dir={work / 'tiny_cache'}", *TRAIN_ARGS])
    assert to_dict(ours) == to_dict(reference)
