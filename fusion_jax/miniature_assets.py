"""The miniature's shipped model: the trained quickstart model and metric models that come with the package.

    fusion_jax/assets/miniature/
      model/          a pixel-space pipeline folder: text_encoder/, tokenizer/, scheduler/, model_index.json,
                      unet/ (the Face Fusion run's UNet, LoRA merged) and identity/
                      (its identity projections: the `export_identity` format every method shares)
      metrics/        the synthfaces identity embedder and attribute reader (`synth_metrics`)
      training.json   the commands that made them, their wall times, the machine and the resolved settings

Why ship them: recognisable faces take about an hour of this miniature's training on 2 CPU cores, so the
quickstart samples and measures the shipped model in minutes and `--from-scratch` retrains every stage (the
same code; the shipped files are what `fusion-jax miniature-assets` writes). Made by the committed command in
training.json, never downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "miniature"
MODEL_DIR = "model"
METRICS_DIR = "metrics"
RECORD_FILE = "training.json"
# Pipeline parts copied next to the exported UNet (the UNet and identity/ come from the export itself). No vae/:
# a pixel model's "VAE" is `PixelCodec` (its config is read from the UNet), and the assets stay under 20 MB.
_PIPELINE_PARTS = ("text_encoder", "tokenizer", "scheduler", "model_index.json")


def shipped_model_dir(root: str | os.PathLike = ASSET_DIR) -> Path:
    """ROOT/model, checked: a clear error naming the folder and the two ways out when it is missing."""
    folder = Path(root) / MODEL_DIR
    missing = [p for p in ("unet/config.json", "identity/identity_config.json", "tokenizer", "text_encoder",
                           "scheduler") if not (folder / p).exists()]
    if missing:
        raise FileNotFoundError(
            f"shipped miniature model {folder}: missing {missing}. Run the quickstart with --from-scratch "
            f"(trains every stage), or write the assets with `fusion-jax miniature-assets` (training.json there "
            f"records the command).")
    return folder


def export_quickstart_model(fusion_workdir: str, pipeline_dir: str, out: str | os.PathLike) -> Path:
    """The Face Fusion run (EMA weights) exported with its pipeline's text encoder, tokenizer and schedule into
    OUT: one folder `load_quickstart_model` reads. Written beside OUT and renamed (a killed export leaves none)."""
    from fusion_jax.experiment import restore_run
    from fusion_jax.experiment.restore import export_run

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run = restore_run(fusion_workdir, use_ema=True)
    export_run(run, tmp, extra={"step": int(run.step), "ema": True})
    for part in _PIPELINE_PARTS:
        source = Path(pipeline_dir) / part
        if source.is_dir():
            shutil.copytree(source, tmp / part)
        elif source.is_file():
            shutil.copy2(source, tmp / part)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def load_quickstart_model(folder: str | os.PathLike) -> tuple[Any, Any]:
    """(pixel pipeline for `sampling.generate`, identity config) of an exported quickstart model folder."""
    from fusion_jax.identity.export import load_identity_model
    from fusion_jax.miniature import pixel_pipeline

    unet, method, cfg = load_identity_model(folder)
    if method is None:
        raise ValueError(f"{folder}: the quickstart model needs an identity/ folder (a Face Fusion export)")
    return pixel_pipeline(folder, unet), cfg


def folder_megabytes(folder: str | os.PathLike) -> float:
    """Size of every file under `folder` in MB (10^6 bytes): the shipped assets stay under 20."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6
