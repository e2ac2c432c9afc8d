"""Training: train state, the sharded train step, Orbax checkpoints, metrics and the generic loop."""

from fusion_jax.training.state import TrainState, learning_rate_schedule, make_optimizer, trainable_filter
from fusion_jax.training.step import Trainer
from fusion_jax.training.synthetic import BatchIterator, SyntheticBatches

__all__ = [
    "BatchIterator",
    "SyntheticBatches",
    "TrainState",
    "Trainer",
    "learning_rate_schedule",
    "make_optimizer",
    "trainable_filter",
]
