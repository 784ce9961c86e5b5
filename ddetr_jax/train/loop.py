"""The training run behind train.py: data, model, step, evaluation, checkpoints, resume.

    final_metrics = train(config, workdir)   # config: ml_collections ConfigDict

Every device of every process joins one ('data',) mesh; each process reads
its own share of every global batch. The run resumes from the latest
checkpoint in WORKDIR (same data order, RNG and schedule: the data iterator
state is in the checkpoint, the dropout RNG is derived from the seed and the
update count). SIGTERM or SIGINT saves a checkpoint at the next step
boundary, then exits. Non-finite steps leave the state unchanged (the step
skips them); after max_consecutive_nonfinite of them in a row the run stops
with RuntimeError, its checkpoints untouched.

Faults: a second run on a workdir in use stops with WorkdirBusy (see
workdir_lock.py); a checkpoint that does not restore completely is set aside
and the run resumes from the newest one that does (CorruptCheckpoint if none
does, nothing moved); the first checkpoint save that fails stops the run with
SaveFailed (checked every step, so no work goes on unsaved).
"""

from __future__ import annotations

import logging
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ddetr_jax.checkpoints.store import Checkpoints, CorruptCheckpoint, SaveFailed
from ddetr_jax.config import run_config, settings as settings_lib
from ddetr_jax.convert import load_backbone_weights
from ddetr_jax.data import pipeline
from ddetr_jax.data.catalog import open_split
from ddetr_jax.evaluation.coco import METRICS, format_metrics
from ddetr_jax.evaluation.loop import evaluate_model, ground_truth_from_source, make_predict_fn
from ddetr_jax.models import DeformableDETR
from ddetr_jax.models.backbone import FrozenStat
from ddetr_jax.optimizer import make_optimizer
from ddetr_jax.postprocess import num_top_for
from ddetr_jax.sharding import ReadBehind, data_mesh, shard_batch, split_model
from ddetr_jax.train.metrics import IntervalMean, MetricsWriter
from ddetr_jax.train.progress import Progress
from ddetr_jax.train.step import init_state, make_train_step
from ddetr_jax.train.workdir_lock import WorkdirBusy, WorkdirLock

log = logging.getLogger(__name__)
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def _display_order(item):
    """loss first, then the loss terms, then everything else, each alphabetically."""
    name = item[0]
    return (name != "loss", not name.startswith("loss"), name)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


class TrainingStopped(Exception):
    """SIGTERM / SIGINT stopped the run; a checkpoint of the step it reached is saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _StopSignal:
    """Remembers SIGTERM / SIGINT until the loop reaches a step boundary."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag: whether it is set on any process (one collective when there are several)."""
    values = np.asarray(flags, np.int32)
    if jax.process_count() > 1:
        values = np.asarray(multihost_utils.process_allgather(values)).max(axis=0)
    return tuple(bool(v) for v in values)


def _lock_workdir(workdir) -> WorkdirLock | None:
    """Process 0 takes the workdir's lock; WorkdirBusy on every process if it is held."""
    lock, busy = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirBusy as error:
            lock, busy = None, error
    if jax.process_count() > 1:
        held = multihost_utils.broadcast_one_to_all(np.int32(busy is not None))
        if held and busy is None:
            raise WorkdirBusy(f"{workdir} is in use by another run (see process 0's output)")
    if busy is not None:
        raise busy
    return lock


def _open_data(s: settings_lib.DataSettings):
    """(train source, eval source); process 0 prepares a missing synthetic dataset first."""
    if s.synthetic and jax.process_index() == 0:
        open_split(s.data_dir, s.name, s.train_split, s.synthetic)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ddetr_jax: dataset ready")
    return (open_split(s.data_dir, s.name, s.train_split, s.synthetic),
            open_split(s.data_dir, s.name, s.eval_split, s.synthetic))


def restore_newest(checkpoints: Checkpoints, target_state, is_main: bool = True):
    """(step, state, extra) of the newest checkpoint that restores completely, or None
    if there is none. The damaged newer ones are moved to WORKDIR/checkpoints_corrupt/
    with a warning naming the file and the error; CorruptCheckpoint listing them all
    (nothing moved) if none restores."""
    skipped = []
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            (state, extra), error = checkpoints.restore(step, target_state), None
        except CorruptCheckpoint as corrupt:
            error = corrupt
        if _any_process(error is not None)[0]:
            skipped.append((step, str(error or "damaged on another process")))
            continue
        _set_aside(checkpoints, skipped, is_main)
        if is_main:
            print(f"resumed from step {step} ({checkpoints.directory / str(step)})", flush=True)
        return step, state, extra
    if skipped:
        raise CorruptCheckpoint(
            f"no checkpoint in {checkpoints.directory} restores:\n  " +
            "\n  ".join(f"step {step}: {why}" for step, why in skipped) +
            "\nNothing was moved. Move the checkpoints folder away to start again.")
    return None


def _set_aside(checkpoints: Checkpoints, skipped, is_main: bool) -> None:
    """Moves the damaged checkpoints [(step, why)] to WORKDIR/checkpoints_corrupt/."""
    if not skipped:
        return
    if is_main:
        for step, why in skipped:
            moved = checkpoints.set_aside(step)
            log.warning("checkpoint %d skipped, it does not restore: %s; moved to %s",
                        step, why, moved)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ddetr_jax: damaged checkpoints set aside")
    checkpoints.reload()


class Trainer:
    """One training run; `run()` trains from the latest checkpoint to total_steps."""

    def __init__(self, config, workdir, *, override_config: bool = False):
        self.workdir = pathlib.Path(workdir).expanduser()
        self.config = config
        self.is_main = jax.process_index() == 0
        self.mesh = data_mesh()
        run_config.check_and_save(config, self.workdir, override=override_config, write=False)
        train_source, self.eval_source = _open_data(settings_lib.data_settings(config))
        self.train_sizes = pipeline.read_sizes(train_source)
        self.s = s = settings_lib.resolve(config, len(train_source), jax.process_count())
        for source in (train_source, self.eval_source):  # before config.json is written
            pipeline.check_category_ids(source, s.train_batch.num_classes)
        settings_lib.check_devices(s.train_batch.global_batch_size, self.mesh.size,
                                   "global_batch_size")
        settings_lib.check_devices(s.eval_batch.global_batch_size, self.mesh.size,
                                   "eval_batch_size")
        if self.is_main:  # every process checked it above; one writes it
            run_config.check_and_save(config, self.workdir, override=override_config)
        self.train_source = train_source

        model = DeformableDETR(s.model, rngs=nnx.Rngs(s.seed))
        if s.backbone_weights:
            ignored = load_backbone_weights(model, s.backbone_weights)
            log.info("backbone weights from %s (ignored: %s)", s.backbone_weights, ignored)
        self.graphdef, params, rest = split_model(model)
        self.frozen = nnx.to_pure_dict(nnx.state(model, FrozenStat))
        self.tx, self.lr = make_optimizer(params, s.optimizer)
        self.state = init_state(params, self.tx, self.mesh)
        self.step_fn = make_train_step(self.graphdef, rest, self.tx, self.lr, self.mesh,
                                       s.loss, DTYPES[s.compute_dtype], s.remat)
        self.predict = make_predict_fn(
            self.graphdef, self.mesh, fixed=(rest,), nms_iou=s.eval_nms_iou,
            num_top=num_top_for(s.model.num_queries, s.model.num_classes))
        self.checkpoints = Checkpoints(self.workdir, s.keep_checkpoints)
        self.ground_truth = None
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0

    # ----------------------------------------------------------------- pieces

    def _train_iterator(self):
        s = self.s
        epochs = -(-s.total_steps // s.steps_per_epoch)
        dataset = pipeline.train_dataset(
            self.train_source, s.train_batch, seed=s.seed, num_epochs=epochs,
            sizes=self.train_sizes, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=s.data.num_workers,
            num_threads=s.data.num_threads, prefetch=s.data.prefetch)
        return iter(dataset)

    def _save(self, iteration, iterator, metrics=None):
        extra = {"data_iterator": iterator.get_state(),
                 "consecutive_nonfinite": self.consecutive_nonfinite,
                 "nonfinite_total": self.nonfinite_total}
        self.checkpoints.save(iteration, self.state, extra, metrics, self.frozen)

    def _restore(self, iterator) -> int:
        """Restores the newest checkpoint that restores completely; its iteration, or 0."""
        restored = restore_newest(self.checkpoints, self.state, self.is_main)
        if restored is None:
            return 0
        step, self.state, extra = restored
        iterator.set_state(extra["data_iterator"])
        self.consecutive_nonfinite = int(extra["consecutive_nonfinite"])
        self.nonfinite_total = int(extra["nonfinite_total"])
        return step

    def _describe(self) -> str:
        """What the run trains on and with what, said once at start."""
        s, devices = self.s, jax.devices()
        buckets = ", ".join(f"{h}x{w}" for h, w in s.train_batch.buckets)
        return (f"training on {s.data.name} split {s.data.train_split} "
                f"({len(self.train_source)} images from {self.train_source.dataset_dir}; "
                f"buckets {buckets}), evaluating on split {s.data.eval_split} "
                f"({len(self.eval_source)} images); {len(devices)} {devices[0].platform} "
                f"device(s) in {jax.process_count()} process(es), global batch "
                f"{s.train_batch.global_batch_size}, {s.total_steps} steps "
                f"({s.steps_per_epoch} per epoch); workdir {self.workdir}")

    def evaluate(self, iteration: int, writer: MetricsWriter) -> dict:
        s = self.s
        if self.ground_truth is None:
            self.ground_truth = ground_truth_from_source(self.eval_source)
        batches = pipeline.eval_dataset(
            self.eval_source, s.eval_batch, process_index=jax.process_index(),
            process_count=jax.process_count(), num_workers=0,
            num_threads=s.data.num_threads, prefetch=s.data.prefetch)
        metrics = evaluate_model(self.predict, (self.state.params,), batches,
                                 self.ground_truth, self.mesh)
        writer.write(iteration, "eval", {k: metrics[k] for k in METRICS})
        if self.is_main:
            print(f"evaluation at step {iteration} ({metrics['num_images']} images, "
                  f"{metrics['eval_seconds']:.1f} s):\n{format_metrics(metrics)}", flush=True)
        return metrics

    def _check_finite(self, iteration: int, nonfinite: bool) -> None:
        if not nonfinite:
            self.consecutive_nonfinite = 0
            return
        self.consecutive_nonfinite += 1
        self.nonfinite_total += 1
        log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, "
                    "%d in total)", iteration, self.consecutive_nonfinite, self.nonfinite_total)
        if self.consecutive_nonfinite >= self.s.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"step {iteration}: {self.consecutive_nonfinite} consecutive non-finite steps "
                f"(max_consecutive_nonfinite={self.s.max_consecutive_nonfinite}); stopping. "
                f"The checkpoints in {self.checkpoints.directory} hold the last finite state. "
                "Lower the learning rate or check the data.")

    # ----------------------------------------------------------------- the loop

    def run(self) -> dict:
        """Trains to total_steps; returns the last evaluation's metrics. Raises
        TrainingStopped after saving if a stop signal came."""
        s = self.s
        if self.is_main:
            print(self._describe(), flush=True)
        iterator = self._train_iterator()
        start = self._restore(iterator)
        if start >= s.total_steps:
            print(f"{self.workdir}: already trained to step {start} of {s.total_steps}; "
                  "nothing to do (evaluate.py evaluates it)", flush=True)
            return {}
        writer = MetricsWriter(self.workdir, resume_step=start, enabled=self.is_main)
        progress = Progress(start, s.total_steps, s.steps_per_epoch,
                            s.train_batch.global_batch_size, enabled=self.is_main)
        rng = jax.random.key(s.seed)
        means, last_eval = IntervalMean(), {}
        unread = ReadBehind(lambda iteration, metrics: self._record_step(
            iteration, metrics, means, writer, progress))
        try:
            with _StopSignal() as stop:
                for iteration in range(start + 1, s.total_steps + 1):
                    batch = shard_batch(next(iterator), self.mesh)
                    self.state, metrics = self.step_fn(self.state, batch, rng)
                    unread.hold(iteration, metrics)
                    if self._reads_at_once(iteration):
                        unread.read()
                        last_eval = self._evaluate_and_save(iteration, iterator, writer) \
                            or last_eval
                    failure = self._save_failure()
                    stopped, failed = _any_process(stop.received is not None,
                                                   failure is not None)
                    if failed:
                        raise failure or SaveFailed("a checkpoint save failed on another "
                                                    "process (see its output); stopping")
                    if stopped:
                        unread.read()
                        if self.checkpoints.latest_step() != iteration:
                            self._save(iteration, iterator)
                        self.checkpoints.wait()
                        raise TrainingStopped(
                            f"stopped by signal {stop.received or 'on another process'} at "
                            f"step {iteration}; checkpoint saved in "
                            f"{self.checkpoints.directory}; rerun the same command to resume",
                            stop.received or signal.SIGTERM)
        finally:
            progress.close()
            writer.close()
            self.checkpoints.wait()
        return last_eval

    def _save_failure(self) -> SaveFailed | None:
        """The failure of the last save, once it has failed (never waits for one)."""
        try:
            self.checkpoints.check_saves()
        except SaveFailed as failure:
            return failure
        return None

    def _reads_at_once(self, iteration: int) -> bool:
        """Whether this step's metrics are read before the next step: it logs,
        evaluates or saves."""
        s = self.s
        return (iteration % s.log_every_steps == 0 or iteration == s.total_steps
                or iteration % s.checkpoint_every_steps == 0 or self._evaluates_at(iteration))

    def _evaluates_at(self, iteration: int) -> bool:
        s = self.s
        return iteration == s.total_steps or (
            s.eval_every_steps > 0 and iteration % s.eval_every_steps == 0)

    def _record_step(self, iteration, metrics, means, writer, progress):
        """A step's metrics: the finiteness check, the interval means, the progress bar,
        and at log steps a metrics row."""
        metrics = jax.device_get(metrics)
        self._check_finite(iteration, bool(metrics["nonfinite"]))
        means.add(metrics)
        progress.update(iteration, float(metrics["loss"]))
        s = self.s
        if iteration % s.log_every_steps == 0 or iteration == s.total_steps:
            record = means.pop()
            record["nonfinite_total"] = self.nonfinite_total
            record["epoch"] = (iteration - 1) // s.steps_per_epoch
            writer.write(iteration, "train", record)
            progress.log(f"step {iteration}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in sorted(record.items(), key=_display_order)))

    def _evaluate_and_save(self, iteration, iterator, writer) -> dict | None:
        """Evaluates at eval steps and saves at eval and checkpoint steps; the evaluation."""
        evaluation = self.evaluate(iteration, writer) if self._evaluates_at(iteration) else None
        if evaluation is not None or iteration % self.s.checkpoint_every_steps == 0:
            self._save(iteration, iterator,
                       None if evaluation is None else {"eval/AP": evaluation["AP"]})
        return evaluation


def train(config, workdir, *, override_config: bool = False) -> dict:
    """Runs (or resumes) the training run of `config` in `workdir`; returns the final
    evaluation metrics. WorkdirBusy if another run holds the workdir."""
    started = time.perf_counter()
    lock = _lock_workdir(workdir)
    try:
        trainer = Trainer(config, workdir, override_config=override_config)
        metrics = trainer.run()
    finally:
        if lock is not None:
            lock.release()
    if trainer.is_main:
        print(f"done in {time.perf_counter() - started:.0f} s; checkpoints in "
              f"{trainer.checkpoints.directory}", flush=True)
    return metrics
