"""Training: train state, the sharded train step, Orbax checkpoints, metrics and the generic loop.

    from fusion_jax.training import train
    result = train(config, model_factory, loss_fn, batch_iterator_factory, workdir)
"""

from fusion_jax.training.checkpoint import Checkpointer
from fusion_jax.training.loop import TrainResult, train
from fusion_jax.training.metrics import MetricsWriter, read_metrics
from fusion_jax.training.state import (
    TrainState,
    learning_rate_schedule,
    make_optimizer,
    maybe_remat,
    remat_policy,
    trainable_filter,
)
from fusion_jax.training.step import Trainer
from fusion_jax.training.synthetic import BatchIterator, SyntheticBatches

__all__ = [
    "BatchIterator",
    "Checkpointer",
    "MetricsWriter",
    "SyntheticBatches",
    "TrainResult",
    "TrainState",
    "Trainer",
    "learning_rate_schedule",
    "make_optimizer",
    "maybe_remat",
    "read_metrics",
    "remat_policy",
    "train",
    "trainable_filter",
]
