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
import dataclasses
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_run(workdir: str, out: str, step: int | None = None, use_ema: bool = False):
    """Restores WORKDIR's checkpoint and writes the export; returns (out, step)."""
    from fusion_jax.config import ConfigError, MeshConfig, load_config, to_dict
    from fusion_jax.experiment import build_experiment, export_face_fusion
    from fusion_jax.parallel import make_mesh
    from fusion_jax.training import Checkpointer, Trainer

    config_path = os.path.join(workdir, "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{workdir}: no config.yaml (not a train/train.py run directory)")
    config = load_config(config_path)
    exp = build_experiment(config)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    trainer = Trainer(exp.model_factory, exp.loss_fn, config.train, mesh, trainable=exp.trainable)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), dataclasses.replace(config.checkpoint,
                                                                                         async_save=False))
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir}/checkpoints: no checkpoint to export")
        state, _, _ = checkpointer.restore(trainer.abstract_state_for(mesh), step)
    finally:
        checkpointer.close()
    model = trainer.model(state, use_ema=use_ema)
    unet = model.unet
    fusion_cfg = config.fusion if config.objective.name == "face_fusion" else None
    export_face_fusion(unet, fusion_cfg, out, extra={"step": int(step), "ema": bool(use_ema and state.ema is not None),
                                                      "workdir": os.path.abspath(workdir),
                                                      "objective": to_dict(config.objective)})
    return out, step


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
