"""Train the quickstart's shipped model and metric models, and write them as the package's assets.

    fusion-jax miniature-assets --out runs/miniature --assets fusion_jax/assets/miniature
    (in a checkout also `python train/miniature_assets.py ...`)

Stages (each resumes from OUT, so an interrupted run continues and a finished stage is not retrained):
  1. the miniature pixel pipeline (OUT/pipeline), 2. the text-to-image base model (OUT/base,
  configs/synthfaces/text_to_image.yaml), 3. Face Fusion on top of it (OUT/fusion, face_fusion.yaml with the
  quickstart's trainable set and lr), 4. the export (OUT/model: UNet with LoRA merged + identity/ + the pipeline's
  text encoder, tokenizer, schedule), 5. the metric models (OUT/metrics, the default setup).
With --assets, OUT/model and OUT/metrics are copied to ASSETS/{model,metrics} and ASSETS/training.json records
this command, each stage's wall time (a stage trained by an earlier run of the same OUT reports the step times
its metrics.jsonl logged), the machine and the resolved settings. The copy must stay under --max-mb (20 MB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def logged_train_seconds(workdir: str) -> Optional[float]:
    """Training time of a run from its metrics.jsonl: the mean logged `step_time_s` x the last step (finished
    steps; compile excluded). None when nothing was logged."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    if not times:
        return None
    return float(sum(times) / len(times) * max(r["step"] for r in rows))


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (resumable)")
    parser.add_argument("--assets", default=None, help="also copy the model + metric models here with training.json")
    parser.add_argument("--base-steps", type=int, default=None, help="base steps (default QuickstartConfig: 5000)")
    parser.add_argument("--fusion-steps", type=int, default=None, help="Face Fusion steps (default QuickstartConfig: 2400)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every stage (weights, data order, metric models)")
    parser.add_argument("--max-mb", type=float, default=20.0, help="refuse to write assets larger than this")
    args = parser.parse_args(argv)

    from fusion_jax import miniature_assets as assets
    from fusion_jax.cli.miniature_base import _commit, _machine
    from fusion_jax.config import to_dict
    from fusion_jax.quickstart import QuickstartConfig, quickstart_stage_configs, train_from_scratch

    kw = {k: v for k, v in (("base_steps", args.base_steps), ("fusion_steps", args.fusion_steps)) if v is not None}
    cfg = QuickstartConfig(out=args.out, from_scratch=True, seed=args.seed, **kw)
    out = os.path.abspath(args.out)
    start = time.perf_counter()
    model_dir, metrics_dir, timings = train_from_scratch(cfg, out, print)
    wall = time.perf_counter() - start
    print(f"model {model_dir}, metric models {metrics_dir} ({wall:.0f}s)")
    if not args.assets:
        return 0
    size = assets.folder_megabytes(model_dir) + assets.folder_megabytes(metrics_dir)
    if size > args.max_mb:
        print(f"error: the model + metric models are {size:.1f} MB, over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    target = Path(args.assets).resolve()
    target.mkdir(parents=True, exist_ok=True)
    for name, source in ((assets.MODEL_DIR, model_dir), (assets.METRICS_DIR, metrics_dir)):
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(source, target / name)
    base, fusion, model_cfg = quickstart_stage_configs(cfg, out)
    stages = {}
    for name, workdir in (("base", base.workdir), ("fusion", fusion.workdir)):
        t = timings.get(name, {})
        stages[name] = {**t, "logged_train_s": logged_train_seconds(workdir), "workdir": workdir}
    record = {
        "command": (prog or "python train/miniature_assets.py") + " " + " ".join(shlex.quote(a) for a in argv),
        "wall_s_this_command": round(wall, 1), "stages": stages,
        "metric_models_s": round(timings.get("metric_models_s", 0.0), 1),
        "metric_setup": cfg.metric_setup, "metric_seed": cfg.seed, "size_mb": round(size, 2),
        "git_commit": _commit(), "machine": _machine(),
        "model": dataclasses.asdict(model_cfg),
        "quickstart": dataclasses.asdict(cfg),
        "base_config": to_dict(base), "fusion_config": to_dict(fusion),
    }
    with open(target / assets.RECORD_FILE, "w") as f:
        json.dump(record, f, indent=2, default=str)
    print(f"wrote {target} ({size:.1f} MB) and {target / assets.RECORD_FILE}")
    return 0
