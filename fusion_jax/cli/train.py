"""`fusion-jax train --config CONFIG workdir=PATH [key=value ...]` (also `python train/train.py ...`).

CONFIG is a shipped config by name (`tiny`, `sd15_face_fusion`, `synthfaces/face_fusion`), a YAML path relative to
the current folder (`configs/tiny.yaml` in a checkout) or an absolute path (`fusion_jax.config_files`).

Thin: resolves the config (YAML `base:` chain + overrides; any mistake is reported before anything loads),
builds the model / loss / batch iterator from it (`fusion_jax.experiment`) and runs `fusion_jax.training.train`.
The run directory gets config.yaml (resolved), metrics.jsonl, tensorboard/ and checkpoints/<step>/; running the
same command again resumes from the newest checkpoint. SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0]) or "train"
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} --config CONFIG workdir=PATH [key=value ...]\n\n{__doc__}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from fusion_jax.config import ConfigError, load_config, split_argv

    try:
        path, overrides = split_argv(argv)
        config = load_config(path, overrides)
        if not config.workdir:
            raise ConfigError("workdir: must be set (workdir=PATH)")
        from fusion_jax.experiment import build_experiment, check_config
        from fusion_jax.parallel import maybe_initialize_distributed

        check_config(config)  # cheap, touches no device: config mistakes surface before the processes meet
        # Multi-process runs (distributed=on, or a coordinator / pod / SLURM environment): before anything
        # below creates the XLA backend (loading the base weights does), or jax.distributed cannot start.
        maybe_initialize_distributed(config.distributed)
        exp = build_experiment(config)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from fusion_jax.training import train

    log = logging.getLogger("train")
    log.warning("training %s (%s, %s, trainable=%s) in %s", config.model.unet_preset or config.model.pipeline,
                config.objective.name, config.data.source, config.train.trainable, config.workdir)
    try:
        result = train(config, exp.model_factory, exp.loss_fn, exp.batch_iterator_factory, config.workdir,
                       pretrained=exp.pretrained,
                       trainable=exp.trainable)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    state = "preempted" if result.preempted else "finished"
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    print(f"{state} at step {result.step}{resumed}; checkpoints in {os.path.join(config.workdir, 'checkpoints')}",
          flush=True)
    return 0
