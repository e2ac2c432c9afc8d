"""Train the miniature text-to-image base model on synthfaces and (optionally) write it as the shipped asset.

    fusion-jax miniature-base --out runs/miniature_base --steps 2400
    fusion-jax miniature-base --out runs/miniature_base --steps 2400 --assets fusion_jax/assets/miniature
    (in a checkout also `python train/miniature_base.py ...`)

The same stages as the quickstart's base stage (`fusion_jax.miniature`): the pipeline folder (random pixel UNet,
word tokenizer, frozen random text encoder; `MiniatureModelConfig`), text-to-image training through
`fusion_jax.experiment` with `configs/synthfaces/text_to_image.yaml`, and the export of the EMA UNet into a
pipeline folder (OUT/base_pipeline). With --assets, that folder is copied to ASSETS/base_pipeline and
ASSETS/training.json records the command, its wall time, the machine and the resolved settings. Running the
same command again resumes from OUT's checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence


# Environment variables that change a run's speed (or devices), recorded beside its wall time.
RECORDED_ENV = ("GLIBC_TUNABLES", "XLA_FLAGS", "JAX_PLATFORMS", "OMP_NUM_THREADS")


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import jax

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()],
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(), "jax": jax.__version__,
            "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ}}


def _commit() -> str:
    """The git commit of this code (its folder inside a checkout), else 'unknown' (an installed wheel)."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return head.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder: pipeline/, base/, base_pipeline/ (resumable)")
    parser.add_argument("--steps", type=int, required=True, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch (default 16)")
    parser.add_argument("--widths", default=None, help="UNet channels per resolution, e.g. 16,32,64 "
                                                        "(default MiniatureModelConfig.widths)")
    parser.add_argument("--prediction-type", default=None, choices=("sample", "v_prediction", "epsilon"),
                        help="UNet target (default MiniatureModelConfig.prediction_type)")
    parser.add_argument("--assets", default=None, help="also write the trained pipeline + training.json here")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of text_to_image.yaml")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error(f"--steps and --batch-size must be >= 1, got {args.steps}, {args.batch_size}")

    from fusion_jax import miniature as mm

    widths = (tuple(int(w) for w in args.widths.split(",")) if args.widths
              else mm.MiniatureModelConfig().widths)
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    base, _, model_cfg = mm.stage_configs(out, args.steps, 1, args.batch_size, widths,
                                          extra_base=tuple(args.overrides))
    if args.prediction_type:  # written into pipeline/scheduler, which training and sampling read
        model_cfg = dataclasses.replace(model_cfg, prediction_type=args.prediction_type)
    mm.write_miniature_pipeline(os.path.join(out, "pipeline"), model_cfg)
    stage = mm.train_stage(base)
    exported = mm.export_base_pipeline(base.workdir, os.path.join(out, "pipeline"), os.path.join(out, "base_pipeline"))
    wall = time.perf_counter() - start
    print(f"base model: {stage}; exported to {exported} ({wall:.0f}s)")
    if args.assets:
        assets = os.path.abspath(args.assets)
        target = os.path.join(assets, "base_pipeline")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(exported, target, ignore=shutil.ignore_patterns("base_run.json"))
        from fusion_jax.config import to_dict

        record = {
            "command": (prog or "python train/miniature_base.py") + " " + " ".join(shlex.quote(a) for a in argv),
            "wall_s": round(wall, 1), "train_s": round(stage["seconds"], 1), "step": stage["step"],
            "trained_here": stage["trained"], "git_commit": _commit(), "machine": _machine(),
            "model": dataclasses.asdict(model_cfg), "config": to_dict(base),
        }
        with open(os.path.join(assets, "training.json"), "w") as f:
            json.dump(record, f, indent=2, default=str)
        print(f"wrote {target} and {os.path.join(assets, 'training.json')}")
    return 0

