"""Train the quickstart's shipped model and metric models, and write them as the package's assets.

    fusion-jax miniature-assets --out runs/miniature --assets fusion_jax/assets/miniature
    (in a checkout also `python train/miniature_assets.py ...`)

Stages (each resumes from OUT, so an interrupted run continues and a finished stage is not retrained):
  1. the miniature pixel pipeline (OUT/pipeline), 2. the text-to-image base model (OUT/base,
  configs/synthfaces/text_to_image.yaml), 3. Face Fusion on top of it (OUT/fusion, face_fusion.yaml with the
  quickstart's trainable set and lr), 4. the export (OUT/model: UNet with LoRA merged + identity/ + the pipeline's
  text encoder, tokenizer, schedule), 5. the metric models (OUT/metrics, the default setup).
Face Fusion trains in the rounds of `quickstart.SHIPPED_FUSION_ROUNDS` (2400 steps on 2 references twice, then 1600
on 4 slots holding 1-4 distinct photos; --fusion-rounds N takes the first N): round r > 1 continues from round
r-1's export (LoRA merged into the UNet, fresh adapters, optimizer and schedule).
With --assets, OUT/model and OUT/metrics are copied to ASSETS/{model,metrics} and ASSETS/training.json records
this command, each stage's wall time (a stage trained by an earlier run of the same OUT reports the step times
its metrics.jsonl logged), the machine and the resolved settings. The copy must stay under --max-mb (20 MB).

    fusion-jax miniature-assets --out runs/next --continue-from fusion_jax/assets/miniature --assets ...

trains one more Face Fusion round on an exported model (ASSETS/model of an earlier run, whose training.json
counts its rounds) instead of every stage: the same code path as round r > 1 from scratch. Its metric models
are kept, and its training.json is kept inside the new one (`continued_from`), so the record still names every
command that made the model.
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

import numpy as np


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


def recorded_rounds(assets_dir: Path) -> tuple[dict, tuple]:
    """(training record, the Face Fusion rounds that made it) of an assets folder. Records list their rounds
    (`QuickstartConfig.fusion_rounds`); older ones give only a count (the shipped recipe's first rounds); records
    from before rounds: 1 round."""
    from fusion_jax import miniature_assets as assets
    from fusion_jax.quickstart import FusionRound, fusion_schedule

    record_file = assets_dir / assets.RECORD_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"--continue-from {assets_dir}: no {assets.RECORD_FILE} (the record of the "
                                "command that made the model; continuing needs it)")
    record = json.loads(record_file.read_text())
    rounds = record.get("quickstart", {}).get("fusion_rounds", 1)
    if isinstance(rounds, list):
        return record, tuple(FusionRound(**r) for r in rounds)
    return record, fusion_schedule(rounds=int(rounds))


def continued_schedule(previous_assets: Path, rounds: Optional[int], steps: Optional[int],
                       references: Optional[int], vary_references: Optional[bool]) -> tuple:
    """The rounds of a model continued from PREVIOUS_ASSETS: its recorded rounds, then the new one (the shipped
    recipe's next round, or its last, as the flags change it). `rounds`, when given, must count the new one."""
    from fusion_jax.quickstart import fusion_schedule

    _, earlier = recorded_rounds(previous_assets)
    done = len(earlier)
    if rounds is not None and rounds != done + 1:
        raise ValueError(f"--continue-from {previous_assets} holds {done} Face Fusion round(s); --fusion-rounds "
                         f"must be {done + 1}, got {rounds}")
    new = fusion_schedule(rounds=done + 1, steps=steps, references=references, vary_references=vary_references)[-1]
    return (*earlier, new)


def continue_round(cfg, out: str, previous_assets: Path, log) -> tuple[Path, Path, dict, dict, object]:
    """One more Face Fusion round on the exported model in PREVIOUS_ASSETS/model: (model folder, metrics folder,
    timings, the previous training record, the round's config). The export is copied into OUT first (the
    assets folder may be the target and is replaced at the end)."""
    from fusion_jax import miniature as mm
    from fusion_jax import miniature_assets as assets
    from fusion_jax import weights
    from fusion_jax.quickstart import quickstart_stage_configs

    previous, earlier = recorded_rounds(previous_assets)
    done = len(earlier)
    if len(cfg.fusion_rounds) != done + 1:
        raise ValueError(f"--continue-from {previous_assets} holds {done} Face Fusion round(s); the schedule "
                         f"must have {done + 1}, got {len(cfg.fusion_rounds)}")
    base, fusions, model_cfg = quickstart_stage_configs(cfg, out)
    fusion = fusions[-1]
    pipeline_dir = os.path.join(out, "pipeline")
    mm.write_miniature_pipeline(pipeline_dir, model_cfg)
    source = assets.shipped_model_dir(previous_assets)
    mine = weights.read_tensors(Path(pipeline_dir) / "text_encoder" / "model.safetensors")
    theirs = weights.read_tensors(source / "text_encoder" / "model.safetensors")
    if mine.keys() != theirs.keys() or any(not np.array_equal(mine[k], theirs[k]) for k in mine):
        raise ValueError(f"{source}/text_encoder differs from the miniature pipeline this code writes for seed "
                         f"{cfg.seed}: the export was made with another pipeline (or --seed)")
    copied = Path(out) / f"{mm.round_name(done)}_model"
    if not (copied / "identity").is_dir():
        shutil.copytree(source, copied.with_name(copied.name + ".tmp"), dirs_exist_ok=True)
        os.rename(copied.with_name(copied.name + ".tmp"), copied)
    metrics_dir = Path(out) / "metrics"
    if not metrics_dir.is_dir():
        shutil.copytree(previous_assets / assets.METRICS_DIR, metrics_dir)
    stage = mm.continuation_stage(fusion, copied, pipeline_dir, out, done + 1)
    log(f"Face Fusion round {done + 1} on {source}: {stage.train.steps} steps, trainable={stage.train.trainable}, "
        f"{stage.data.pipeline.num_references} references per example")
    timings = {mm.round_name(done + 1): mm.train_stage(stage, log)}
    model_dir = Path(out) / "model"
    if not (model_dir / "identity").is_dir() or timings[mm.round_name(done + 1)]["trained"]:
        assets.export_quickstart_model(stage.workdir, pipeline_dir, model_dir)
    return model_dir, metrics_dir, timings, previous, stage


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (resumable)")
    parser.add_argument("--assets", default=None, help="also copy the model + metric models here with training.json")
    parser.add_argument("--base-steps", type=int, default=None, help="base steps (default QuickstartConfig: 5000)")
    parser.add_argument("--fusion-steps", type=int, default=None,
                        help="Face Fusion steps of every round trained (default: the shipped recipe's, "
                             "quickstart.SHIPPED_FUSION_ROUNDS: 2400 / 2400 / 1600)")
    parser.add_argument("--fusion-rounds", type=int, default=None,
                        help="the first N rounds of the shipped Face Fusion recipe (default 3); with "
                             "--continue-from, the total after this round (default: the previous model's + 1)")
    parser.add_argument("--continue-from", default=None,
                        help="an assets folder (model/ + training.json): train only one more Face Fusion round on it")
    parser.add_argument("--fusion-references", type=int, default=None,
                        help="reference photos per Face Fusion training example in every round trained (default: "
                             "the recipe's, 2 / 2 / 4)")
    parser.add_argument("--vary-references", action=argparse.BooleanOptionalAction, default=None,
                        help="each Face Fusion training example draws 1..--fusion-references distinct photos, in "
                             "every round trained (default: the recipe's, only in round 3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every stage (weights, data order, metric models)")
    parser.add_argument("--max-mb", type=float, default=20.0, help="refuse to write assets larger than this")
    args = parser.parse_args(argv)

    from fusion_jax import miniature as mm
    from fusion_jax import miniature_assets as assets
    from fusion_jax.cli.miniature_base import _commit, _machine
    from fusion_jax.config import to_dict
    from fusion_jax.quickstart import (QuickstartConfig, fusion_schedule, quickstart_stage_configs,
                                      train_from_scratch)

    kw = {} if args.base_steps is None else {"base_steps": args.base_steps}
    flags = dict(steps=args.fusion_steps, references=args.fusion_references, vary_references=args.vary_references)
    out = os.path.abspath(args.out)
    start = time.perf_counter()
    previous = None
    if args.continue_from:
        previous_assets = Path(args.continue_from).resolve()
        try:
            schedule = continued_schedule(previous_assets, args.fusion_rounds, **flags)
            cfg = QuickstartConfig(out=args.out, from_scratch=True, seed=args.seed, fusion_rounds=schedule, **kw)
            model_dir, metrics_dir, timings, previous, last = continue_round(cfg, out, previous_assets, print)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        workdirs = {mm.round_name(len(cfg.fusion_rounds)): last.workdir}
    else:
        try:
            schedule = fusion_schedule(rounds=args.fusion_rounds, **flags)
        except ValueError as err:
            print(f"error: --fusion-rounds: {err}", file=sys.stderr)
            return 1
        cfg = QuickstartConfig(out=args.out, from_scratch=True, seed=args.seed, fusion_rounds=schedule, **kw)
        model_dir, metrics_dir, timings, last = train_from_scratch(cfg, out, print)
        workdirs = {"base": quickstart_stage_configs(cfg, out)[0].workdir,
                    **{mm.round_name(r): os.path.join(out, mm.round_name(r))
                       for r in range(1, len(cfg.fusion_rounds) + 1)}}
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
    stages = {name: {**timings.get(name, {}), "logged_train_s": logged_train_seconds(workdir), "workdir": workdir}
              for name, workdir in workdirs.items()}
    base, _, model_cfg = quickstart_stage_configs(cfg, out)
    record = {
        "command": (prog or "python train/miniature_assets.py") + " " + " ".join(shlex.quote(a) for a in argv),
        "wall_s_this_command": round(wall, 1), "stages": stages,
        "metric_models_s": round(timings.get("metric_models_s", 0.0), 1),
        "metric_setup": cfg.metric_setup, "metric_seed": cfg.seed, "size_mb": round(size, 2),
        "git_commit": _commit(), "machine": _machine(),
        "model": dataclasses.asdict(model_cfg),
        "quickstart": dataclasses.asdict(cfg),
        "fusion_config": to_dict(last),
    }
    if previous is not None:
        record["continued_from"] = previous  # the record of the model this round started from (its commands)
    else:
        record["base_config"] = to_dict(base)
    with open(target / assets.RECORD_FILE, "w") as f:
        json.dump(record, f, indent=2, default=str)
    print(f"wrote {target} ({size:.1f} MB) and {target / assets.RECORD_FILE}")
    return 0
