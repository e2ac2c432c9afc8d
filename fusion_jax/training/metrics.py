"""Metrics sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard event files.

Only process 0 writes. Values arrive as host floats (the loop reads device metrics every `logging.every`
steps, the one place the training loop syncs with the device).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import jax


class MetricsWriter:
    """Appends scalar metrics to `metrics.jsonl` and (optionally) TensorBoard under `tensorboard/`."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its last lines
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str) -> list[dict]:
    """All records of `WORKDIR/metrics.jsonl` (a trailing partial line from a killed run is ignored)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def latest_metric_step(workdir: str) -> Optional[int]:
    records = read_metrics(workdir)
    return records[-1]["step"] if records else None
