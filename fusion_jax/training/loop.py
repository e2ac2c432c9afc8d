"""The generic training loop: config in, checkpoints + metrics out; resumes and survives preemption.

    result = train(config, model_factory, loss_fn, batch_iterator_factory, workdir)

The loop is deliberately plain: fetch a host batch, shard it, run the jitted step (async dispatch), and every
`logging.every` steps read the accumulated metrics (the only device sync), every `checkpoint.every` steps
start an async save. All problems a config can have (mesh, batch size, workdir, trainable selector) are
reported before anything compiles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from fusion_jax.config import ConfigError, ExperimentConfig, save_config, to_dict
from fusion_jax.parallel import check_batch_size, make_mesh, maybe_initialize_distributed, shard_batch
from fusion_jax.training.checkpoint import Checkpointer
from fusion_jax.training.metrics import MetricsWriter
from fusion_jax.training.state import LossFn, ModelFactory, TrainState
from fusion_jax.training.step import Trainer
from fusion_jax.training.synthetic import BatchIterator

log = logging.getLogger(__name__)

BatchIteratorFactory = Callable[[Any], BatchIterator]
# sample_fn(model, step, workdir): writes sample grids; gets the EMA model when an EMA is kept.
SampleFn = Callable[[Any, int, str], None]


@dataclasses.dataclass
class TrainResult:
    """What `train` leaves behind (beyond the workdir)."""

    state: TrainState  # the final (or preempted) train state, sharded
    trainer: Trainer  # graphdef, shardings and the compiled step (e.g. `trainer.model(state)`)
    step: int  # steps completed
    preempted: bool  # True when stopped by SIGTERM / a preemption notice (a checkpoint was saved)
    resumed_from: Optional[int]  # checkpoint step the run started from, None for a fresh start


class _StopFlag:
    """SIGTERM -> flag checked after every step (the handler itself does no I/O)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        else:  # Python only delivers signals to the main thread
            log.warning("train() is not on the main thread: SIGTERM will not trigger a checkpoint")

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.set = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def device_fields(batch: Any) -> Any:
    """Drops host-only fields (strings, objects: e.g. raw captions) from a dict batch before it goes to devices."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if np.asarray(v).dtype.kind not in "OSUV"}
    return batch


def _check_before_compiling(config: ExperimentConfig, workdir: str):
    if not workdir:
        raise ConfigError("workdir: must be set (workdir=PATH on the command line or in the YAML)")
    maybe_initialize_distributed(config.distributed)  # before the first device query
    mesh = make_mesh(config.mesh)  # mesh errors (sizes vs device count) are raised here
    check_batch_size(config.data.batch_size, mesh, config.train.grad_accum)
    if config.checkpoint.every < 0 or config.logging.every < 1:
        raise ConfigError("checkpoint.every must be >= 0 and logging.every >= 1")
    return mesh


def train(
    config: ExperimentConfig,
    model_factory: ModelFactory,
    loss_fn: LossFn,
    batch_iterator_factory: BatchIteratorFactory,
    workdir: Optional[str] = None,
    *,
    sample_fn: Optional[SampleFn] = None,
    trainable: Optional[Any] = None,
    pretrained: Optional[Any] = None,
) -> TrainResult:
    """Trains `config.train.steps` steps (resuming from WORKDIR/checkpoints when there is a checkpoint).

    Args:
      config: the resolved experiment config (saved to WORKDIR/config.yaml and into every checkpoint).
      model_factory: `rngs -> nnx.Module`, traced under jit (never run eagerly).
      loss_fn: `(model, batch, rng) -> (loss, aux dict)`.
      batch_iterator_factory: `config -> iterator` of host numpy batches with `get_state()` / `set_state()`.
      workdir: run directory (default `config.workdir`).
      sample_fn: optional hook called every `logging.sample_every` steps.
      trainable: nnx filter overriding `config.train.trainable`.
      pretrained: host arrays handed to `model_factory(rngs, pretrained)` as arguments of the init jit (see
        `Trainer`); None calls `model_factory(rngs)`.
    """
    workdir = workdir or config.workdir
    mesh = _check_before_compiling(config, workdir)
    workdir = os.path.abspath(workdir)
    config = dataclasses.replace(config, workdir=workdir)  # the saved config names the real run directory
    tcfg, lcfg, ccfg = config.train, config.logging, config.checkpoint
    if jax.process_index() == 0:
        save_config(config, os.path.join(workdir, "config.yaml"))

    trainer = Trainer(model_factory, loss_fn, tcfg, mesh, trainable=trainable, pretrained=pretrained)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), ccfg)
    batches = batch_iterator_factory(config)
    resumed_from = checkpointer.latest_step() if ccfg.resume else None
    if resumed_from is not None:
        state, data_state, _ = checkpointer.restore(trainer.abstract_state_for(mesh), resumed_from)
        batches.set_state(data_state)
        log.info("resumed from %s at step %d", checkpointer.directory, resumed_from)
    else:
        state = trainer.init()
    start = int(jax.device_get(state.step))

    writer = MetricsWriter(workdir, lcfg.tensorboard)
    stop = _StopFlag()
    stop.install()
    bar = tqdm(
        total=tcfg.steps, initial=start, disable=not (lcfg.progress_bar and jax.process_index() == 0),
        desc="train", dynamic_ncols=True,
    )
    pending: list[dict] = []  # device metrics since the last log (read at the next log point)
    step = start
    last_log_time, last_log_step = time.perf_counter(), start
    preempted = False
    config_dict = to_dict(config)
    try:
        while step < tcfg.steps:
            batch = shard_batch(device_fields(next(batches)), mesh)
            state, metrics = trainer.step(state, batch)
            step += 1
            pending.append(metrics)
            bar.update(1)
            if step == start + 1:  # first step: compile time, measured once (one sync at start-up)
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - last_log_time
                writer.write(step, {"compile_and_first_step_s": compile_s})
                last_log_time, last_log_step = time.perf_counter(), step
                pending_first = pending
                pending = []
                _log_metrics(writer, bar, pending_first, step, 0.0, 0, tcfg, config.data.batch_size)
            elif step % lcfg.every == 0 or step == tcfg.steps:
                now = time.perf_counter()
                _log_metrics(
                    writer, bar, pending, step, now - last_log_time, step - last_log_step, tcfg,
                    config.data.batch_size,
                )
                pending = []
                last_log_time, last_log_step = now, step
            if ccfg.every and step % ccfg.every == 0:
                checkpointer.save(step, state, batches.get_state(), config_dict)
            if sample_fn is not None and lcfg.sample_every and step % lcfg.sample_every == 0:
                sample_fn(trainer.model(state, use_ema=True), step, workdir)
            if stop.set or checkpointer.reached_preemption(step):
                preempted = step < tcfg.steps
                break
        checkpointer.save(step, state, batches.get_state(), config_dict)
        checkpointer.wait()
    finally:
        stop.uninstall()
        bar.close()
        writer.close()
        checkpointer.close()
    if preempted:
        log.warning("preempted: saved step %d to %s", step, checkpointer.directory)
    return TrainResult(state, trainer, step, preempted, resumed_from)


def _log_metrics(writer, bar, pending, step, elapsed, steps, tcfg, batch_size) -> None:
    """Reads the pending device metrics (host sync), writes means / last values, checks skipped steps."""
    if not pending:
        return
    host = jax.device_get(pending)
    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[-1] if k not in ("skipped_steps", "finite")}
    scalars["lr"] = float(host[-1]["lr"])
    scalars["skipped_steps"] = int(host[-1]["skipped_steps"])
    if steps:
        scalars["step_time_s"] = elapsed / steps
        scalars["examples_per_s"] = batch_size * steps / elapsed if elapsed > 0 else 0.0
    writer.write(step, scalars)
    bar.set_postfix(loss=f"{scalars['loss']:.4g}", skipped=scalars["skipped_steps"], refresh=False)
    limit = tcfg.max_skipped_steps
    if limit is not None and scalars["skipped_steps"] > limit:
        raise FloatingPointError(
            f"{scalars['skipped_steps']} steps had a non-finite loss or gradient (train.max_skipped_steps="
            f"{limit}); last loss {host[-1]['loss']}, grad norm {host[-1]['grad_norm']} at step {step}"
        )
