"""Orbax checkpoints: WORKDIR/checkpoints/<step>/{state, data, config}.

- `state`: the whole `TrainState` (trainable params, frozen variables, optimizer state, EMA, step, RNG,
  skipped-step count) written by `StandardSave`, each host writing its own shards.
- `data`: the data iterator's `get_state()` dict (its position), so a resumed run sees the same batches.
- `config`: the resolved experiment config (as JSON), next to the YAML copy in the workdir.

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when every item is
complete; an interrupted save therefore never shows up as a step (`all_steps`), and leftover temporary
directories are deleted when the manager is opened. Retention: the newest `keep_last` plus every step that
is a multiple of `keep_every`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from fusion_jax.config import CheckpointConfig

ITEMS = ("state", "data", "config")


class Checkpointer:
    """A thin, typed wrapper over `ocp.CheckpointManager` for train states."""

    def __init__(self, directory: str, cfg: CheckpointConfig):
        self.directory = os.path.abspath(directory)
        policies = [pp.LatestN(max(cfg.keep_last, 1))]
        if cfg.keep_every:
            policies.append(pp.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Mapping[str, int], config: Mapping[str, Any]) -> bool:
        """Starts saving (returns once device data is copied; the write continues in the background)."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({k: int(v) for k, v in dict(data_state).items()}),
                config=ocp.args.JsonSave(dict(config)),
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict[str, int], dict]:
        """(state, data_state, config) of `step` (default newest), placed as `abstract_state`'s shardings.

        `abstract_state`: `jax.ShapeDtypeStruct`s with the target shardings (`Trainer.abstract_state_for(mesh)`),
        so a checkpoint written on one mesh restores onto any other mesh or device count.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["data"] or {}), dict(restored["config"] or {})

    def wait(self) -> None:
        """Blocks until background writes are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        """True on every host once any host got a preemption notice (multi-host sync; False on one host)."""
        if jax.process_count() == 1:
            return False
        return bool(self.manager.reached_preemption(step))
