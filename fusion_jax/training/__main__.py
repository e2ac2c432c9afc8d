"""`python -m fusion_jax.training --config configs/tiny.yaml workdir=/tmp/run [key=value ...]`

Trains the tiny synthetic model (`fusion_jax.training.tiny`) on `data.source: synthetic`: a smoke test of the
whole trainer (sharding, checkpoints, resume, preemption) that runs in seconds on a CPU. Real models go
through `train/train.py`.
"""

from __future__ import annotations

import logging
import sys

from fusion_jax.config import ConfigError, load_config, split_argv


def main(argv: list[str]) -> int:
    try:
        path, overrides = split_argv(argv)
        config = load_config(path, overrides)
        if config.data.source != "synthetic":
            raise ConfigError(f"data.source={config.data.source!r}: this entry point only runs 'synthetic'")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from fusion_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed(config.distributed)  # first JAX work of a multi-process run (see parallel.py)
    from fusion_jax.training.loop import train
    from fusion_jax.training.synthetic import SyntheticBatches
    from fusion_jax.training.tiny import BATCH_SPEC, make_tiny_model, tiny_loss

    def batches(cfg):
        return SyntheticBatches(BATCH_SPEC, cfg.data.batch_size, cfg.data.seed)

    result = train(config, make_tiny_model, tiny_loss, batches)
    print(f"{'preempted' if result.preempted else 'finished'} at step {result.step}", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # orbax logs every save step at INFO
    sys.exit(main(sys.argv[1:]))
