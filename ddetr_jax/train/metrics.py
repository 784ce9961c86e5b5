"""Training metrics: interval means, WORKDIR/metrics.jsonl, TensorBoard, stdout.

metrics.jsonl holds one JSON object per line: {"step": s, "train/loss": ...,
...} for training (means over the logging interval) and {"step": s,
"eval/AP": ..., ...} for evaluations; TensorBoard event files go to
WORKDIR/tensorboard. A run that starts from iteration s (0: from scratch,
also when an earlier attempt left records but no checkpoint) moves the records
after s, which it writes again, out of metrics.jsonl into
metrics.jsonl.replaced-<s>, and TensorBoard purges them, so every step
appears once in each. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from tensorboardX import SummaryWriter


class IntervalMean:
    """Means of scalar metrics over the steps added since the last `pop`."""

    def __init__(self):
        self._sums, self._count = {}, 0

    def add(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(np.asarray(value))
        self._count += 1

    def pop(self) -> dict:
        means = {name: total / self._count for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


def _jsonable(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Writes records to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir, resume_step: int = 0, enabled: bool = True):
        """resume_step: the iteration the run starts from (0: from scratch)."""
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                          purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep, moved = [], []
        for line in self.path.read_text().splitlines():
            (moved if json.loads(line)["step"] > step else keep).append(line)
        if moved:
            self.path.with_name(f"metrics.jsonl.replaced-{step}").write_text(
                "\n".join(moved) + "\n")
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, step: int, prefix: str, scalars: dict) -> None:
        """One record: {"step": step, prefix/name: value, ...}."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({f"{prefix}/{name}": _jsonable(v) for name, v in scalars.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{prefix}/{name}", float(value), int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
