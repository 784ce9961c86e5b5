"""The progress bar of a training run (tqdm): step, epoch, loss, images/s, ETA."""

from __future__ import annotations

import time

from tqdm import tqdm


class Progress:
    """Shown on process 0 only (enabled); log() prints above the bar. images/s is
    measured over the last WINDOW steps."""

    WINDOW = 10

    def __init__(self, start: int, total: int, steps_per_epoch: int, global_batch: int,
                 enabled: bool = True):
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
        self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         mininterval=1.0, disable=not enabled)
        self._times = [(start, time.perf_counter())]

    def update(self, iteration: int, loss: float) -> None:
        self._times = (self._times + [(iteration, time.perf_counter())])[-self.WINDOW - 1:]
        (first, t0), (last, t1) = self._times[0], self._times[-1]
        rate = (last - first) * self.global_batch / max(t1 - t0, 1e-9)
        self._bar.set_postfix(epoch=(iteration - 1) // self.steps_per_epoch,
                              loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
        self._bar.update(iteration - self._bar.n)

    def log(self, message: str) -> None:
        if not self._bar.disable:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
