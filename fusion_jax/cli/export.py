"""`fusion-jax export --workdir W --out DIR [--step N] [--ema]` (also `python train/export.py ...`).

Writes
  DIR/unet/                       diffusers UNet2DConditionModel folder (config.json + safetensors; LoRA adapters,
                                  if trained, merged into their kernels) -> `UNet2DConditionModel.from_pretrained`
  DIR/identity/<method>.safetensors + identity_config.json
                                  the identity method's own trained tensors (torch names/layouts; e.g. Face Fusion's
                                  identity projections) and its config section, naming the method;
                                  `fusion_jax.identity.export.load_identity_model(DIR)` loads UNet + modules back
                                  (`fusion-jax generate --identity-weights DIR` does it for generation).
The checkpoint (newest, or --step) is restored onto the local devices whatever mesh wrote it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence


def export_run(workdir: str, out: str, step: int | None = None, use_ema: bool = False):
    """Restores WORKDIR's checkpoint and writes the export; returns (out, step)."""
    from fusion_jax.config import to_dict
    from fusion_jax.experiment import restore_run
    from fusion_jax.experiment.restore import export_run as export_restored

    run = restore_run(workdir, step, use_ema)
    export_restored(run, out, extra={"step": run.step, "ema": run.used_ema, "workdir": os.path.abspath(workdir),
                                     "objective": to_dict(run.config.objective)})
    return out, run.step


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory of `fusion-jax train`")
    parser.add_argument("--out", required=True, help="export folder (created)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--ema", action="store_true", help="export the EMA params (when the run kept an EMA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # orbax logs every restore at INFO
    from fusion_jax.config import ConfigError

    try:
        out, step = export_run(args.workdir, args.out, args.step, args.ema)
    except (ConfigError, FileNotFoundError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} to {out}", flush=True)
    return 0
