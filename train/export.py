"""Export a trained run: `python train/export.py --workdir W --out DIR [--step N] [--ema]`

Writes
  DIR/unet/                       diffusers UNet2DConditionModel folder (config.json + safetensors; LoRA adapters,
                                  if trained, merged into their kernels) -> `UNet2DConditionModel.from_pretrained`
  DIR/identity/identity_modules.safetensors + identity_config.json
                                  the Face Fusion identity projections (torch names/layouts) and the FusionConfig
                                  they were trained with; `fusion_jax.experiment.load_identity_modules(unet, DIR)`
                                  attaches and fills them on our UNet (`load_face_fusion_unet(DIR)` does both).
The checkpoint (newest, or --step) is restored onto the local devices whatever mesh wrote it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_run(workdir: str, out: str, step: int | None = None, use_ema: bool = False):
    """Restores WORKDIR's checkpoint and writes the export; returns (out, step)."""
    from fusion_jax.config import to_dict
    from fusion_jax.experiment import export_face_fusion, restore_run

    run = restore_run(workdir, step, use_ema)
    config = run.config
    fusion_cfg = config.fusion if config.objective.name == "face_fusion" else None
    export_face_fusion(run.model.unet, fusion_cfg, out, extra={"step": run.step, "ema": run.used_ema,
                                                                "workdir": os.path.abspath(workdir),
                                                                "objective": to_dict(config.objective)})
    return out, run.step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory of train/train.py")
    parser.add_argument("--out", required=True, help="export folder (created)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--ema", action="store_true", help="export the EMA params (when the run kept an EMA)")
    args = parser.parse_args(argv)
    from fusion_jax.config import ConfigError

    try:
        out, step = export_run(args.workdir, args.out, args.step, args.ema)
    except (ConfigError, FileNotFoundError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {step} to {out}", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
