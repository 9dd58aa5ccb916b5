"""The job logic behind the tasks: claim the run, train with service.ml (resuming from the
last checkpoint), persist every epoch, mark the final state.

Failure policy:
- bad data, diverging loss (NaN/inf), out of memory -> ``failed`` with a clear message, no retry;
- transient infrastructure errors (database/broker unreachable) -> retried in place with
  backoff for ``transient_retry_s``, then raised so Celery retries the task; meanwhile the
  lease runs out and the reconciler hands the run out again — nothing is lost;
- worker shutdown -> the run goes back to the queue and resumes from its last checkpoint;
- cancel requested -> ``cancelled`` at the next batch boundary, metrics so far kept.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch

from service.batch_predictions import execution as batch_execution
from service.batch_predictions import repository as batch_repository
from service.batch_predictions import service as batch_predictions
from service.config import Settings
from service.datasets import service as datasets
from service.db import session_scope, utcnow
from service.jobs import reconciler, webhooks
from service.jobs.transient import is_transient, retry_transient
from service.ml.training import EpochMetrics, NonFiniteLossError, Trainer, TrainingCancelled, TrainingError
from service.runs import checkpoints, lifecycle, repository
from service.runs.modelling import prepare_training
from service.runs.models import RunStatus
from service.runs.schemas import RunCreate
from service.sweeps.execution import Checkpoint, run_sweep
from service.sweeps.schemas import SweepCreate
from workers.daemon import Attempt, WorkerDaemon

log = logging.getLogger(__name__)


def choose_device(settings: Settings, requested: str | None) -> str:
    """The device a run trains on: the run may insist on cpu; cuda whenever it is there."""
    if requested == "cpu" or settings.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda" or settings.device == "cuda":
        raise TrainingError("the run asks for CUDA but this worker has no CUDA device")
    return "cpu"


def warm_up(device: str = "cpu") -> None:
    """Pay a fresh worker process's one-time costs before it takes its first run.

    The first run in a process would otherwise carry them in its started_at → finished_at:
    above all the first ``torch.optim`` optimiser, which imports ``torch._dynamo`` (~1 s here),
    and the first use of each torch op, checkpoint, evaluation and weights code path. So the
    worker trains a tiny classifier and a tiny regression net through the same code a run uses
    (two epochs each, a checkpoint, the MC evaluation, the weights), touching no database and
    leaving torch's global RNG as it found it.
    """
    import numpy as np

    from service.ml.data import Dataset

    started = time.perf_counter()
    features = np.linspace(-1.0, 1.0, 48 * 4, dtype=np.float32).reshape(48, 4)
    for task, target in (("classification", (np.arange(48) % 3).astype(np.int64)),
                         ("regression", features.sum(axis=1))):
        dataset = Dataset(features=features, target=target, task=task, feature_names=["a", "b", "c", "d"],
                          class_names=["0", "1", "2"] if task == "classification" else None, target_name="y")
        spec = RunCreate.model_validate({
            "dataset_id": str(uuid.UUID(int=0)), "model": {"hidden_layers": [8], "dropout": 0.5},
            "training": {"epochs": 2, "batch_size": 16, "seed": 0, "validation_fraction": 0.25},
            "evaluation": {"samples": 4},
        })
        with torch.random.fork_rng(devices=[]):
            job = prepare_training(dataset, spec, device=device)
            job.fit()
            checkpoints.deserialize(checkpoints.serialize(job.trainer.state_dict()), device)
            model = job.finish()
            job.evaluate(spec.evaluation.samples, seed=0)
            model.weights_blob()
    log.info("worker warmed up on %s in %.2f s", device, time.perf_counter() - started)


def train_run(
    run_id: uuid.UUID, settings: Settings, daemon: WorkerDaemon,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    url = settings.sqlalchemy_url
    budget = settings.transient_retry_s
    attempt = daemon.track(run_id)
    try:
        claimed = retry_transient(lambda: _claim(settings, run_id, attempt, daemon), budget_s=budget, what=f"claim run {run_id}")
        if claimed is None:
            return
        kind, spec_data, dataset, checkpoint_blob, device = claimed
        if kind == batch_predictions.KIND:
            _batch_predict(settings, run_id, attempt, device, should_stop)
        elif kind == "sweep":
            _sweep(settings, run_id, attempt, spec_data, dataset, checkpoint_blob, should_stop)
        else:
            spec = RunCreate.model_validate(spec_data)
            _train(settings, run_id, attempt, spec, dataset, checkpoint_blob, device, should_stop)
    finally:
        daemon.untrack(attempt)
    try:  # the terminal event's webhook, right away (the reconciler retries failures)
        webhooks.deliver_due(settings)
    except Exception as exc:
        log.warning("webhook delivery deferred: %s", exc)


def _claim(settings: Settings, run_id: uuid.UUID, attempt: Attempt, daemon: WorkerDaemon):
    with session_scope(settings.sqlalchemy_url) as session:
        row = repository.get(session, run_id)
        if row is None:
            log.warning("run %s does not exist; message dropped", run_id)
            return None
        if row.status in RunStatus.TERMINAL:
            log.info("run %s is already %s; nothing to do", run_id, row.status)
            return None
        spec_data = {key: value for key, value in row.spec.items() if key != "task"}
        try:
            device = choose_device(settings, spec_data.get("device"))
        except TrainingError as exc:
            lifecycle.transition(session, run_id, RunStatus.FAILED, expected=[RunStatus.QUEUED], values={"error": str(exc)})
            return None
        if not lifecycle.claim(session, run_id, owner=attempt.owner, worker=daemon.name, device=device,
                               lease_s=settings.lease_s):
            session.rollback()
            log.info("run %s is held by another worker (or not claimable); nothing to do", run_id)
            return None
        session.commit()
        attempt.claimed.set()  # the daemon renews the lease from now on
        # a batch prediction reads its own input (_batch_predict)
        dataset = datasets.load_arrays(session, row.dataset_id) if row.kind != batch_predictions.KIND else None
        stored = repository.checkpoint(session, run_id)
        return (row.kind, {**spec_data, "dataset_id": row.dataset_id}, dataset,
                stored.state if stored is not None else None, device)


def _batch_predict(settings: Settings, run_id: uuid.UUID, attempt: Attempt, device: str, should_stop) -> None:
    """A batch prediction: predict its chunks in order, each stored with the job's progress in
    one fenced transaction; resumed (after a shutdown, a lost lease, a killed worker) from the
    chunks already stored, which are never predicted again."""
    url, budget = settings.sqlalchemy_url, settings.transient_retry_s

    def stop_requested() -> bool:
        return should_stop() or attempt.lost.is_set() or attempt.cancel_requested.is_set()

    def load() -> tuple[batch_execution.PreparedJob, dict[int, int]]:
        with session_scope(url) as session:
            return batch_predictions.prepare(session, run_id, device)

    def work() -> None:
        job, done = retry_transient(load, budget_s=budget, what=f"load batch prediction {run_id}")
        if done:
            log.info("batch prediction %s resumes after %d of %d chunks", run_id, len(done), job.n_chunks)
        log.info("batch prediction %s: %d rows in %d chunks on %s", run_id, job.rows.n_rows, job.n_chunks, device)

        def save(chunk: int, rows: int, data: bytes) -> None:
            def write() -> bool:
                with session_scope(url) as session:
                    return batch_repository.record_chunk(session, run_id, attempt.owner, chunk=chunk, rows=rows,
                                                         data=data, chunks_total=job.n_chunks)

            if retry_transient(write, budget_s=budget, what=f"store chunk {chunk} of batch prediction {run_id}"):
                attempt.cancel_requested.set()

        batch_execution.run(job, done=done, save=save, should_stop=stop_requested)

        def store() -> None:
            with session_scope(url) as session:
                batch_repository.succeed(session, run_id, attempt.owner, batch_predictions.results_summary(job))

        retry_transient(store, budget_s=budget, what=f"finish batch prediction {run_id}")
        log.info("batch prediction %s succeeded", run_id)

    _finish(settings, run_id, attempt, device, work, should_stop)


def _sweep(settings, run_id, attempt: Attempt, spec_data: dict, dataset, checkpoint_blob, should_stop) -> None:
    """A sweep: stacked training of the grid × splits, checkpointed at epoch boundaries."""
    url, budget = settings.sqlalchemy_url, settings.transient_retry_s
    spec = SweepCreate.model_validate(spec_data)

    def stop_requested() -> bool:
        return should_stop() or attempt.lost.is_set() or attempt.cancel_requested.is_set()

    def save(checkpoint: Checkpoint, epochs_done: int) -> None:
        blob = checkpoints.serialize(checkpoint.to_dict())

        def write() -> bool:
            with session_scope(url) as session:
                return repository.record_epoch(session, run_id, attempt.owner, None, blob, epoch=epochs_done,
                                               event={"phase": checkpoint.phase})

        if retry_transient(write, budget_s=budget, what=f"checkpoint sweep {run_id}"):
            attempt.cancel_requested.set()

    def work() -> None:
        resumed = Checkpoint.from_dict(checkpoints.deserialize(checkpoint_blob)) if checkpoint_blob else None
        if resumed is not None:
            log.info("sweep %s resumes in its %s phase (stack %d)", run_id, resumed.phase, resumed.group)
        results = run_sweep(dataset, spec, checkpoint=resumed, save=save, should_stop=stop_requested)

        def store() -> None:
            with session_scope(url) as session:
                repository.succeed(session, run_id, attempt.owner, results=results)

        retry_transient(store, budget_s=budget, what=f"store the results of sweep {run_id}")
        log.info("sweep %s succeeded", run_id)

    _finish(settings, run_id, attempt, "cpu", work, should_stop)


def _train(settings, run_id, attempt: Attempt, spec: RunCreate, dataset, checkpoint_blob, device, should_stop) -> None:
    """A run: train (from the last checkpoint), record every epoch, evaluate, store the weights.

    Finished epochs are written in batches (``_EpochRecorder``): their metrics, events,
    epochs_done and a checkpoint in one transaction at most every ``checkpoint_interval_s``
    and after the last epoch, so short epochs do not each pay a checkpoint and a commit.
    """
    url, budget = settings.sqlalchemy_url, settings.transient_retry_s

    def stop_requested() -> bool:
        return should_stop() or attempt.lost.is_set() or attempt.cancel_requested.is_set()

    def work() -> None:
        job = prepare_training(dataset, spec, device=device)
        if checkpoint_blob is not None:
            job.trainer.load_state_dict(checkpoints.deserialize(checkpoint_blob, device))
            log.info("run %s resumes after epoch %d", run_id, job.trainer.epochs_done)
        recorder = _EpochRecorder(settings, run_id, attempt, job.trainer)
        log.info("training run %s on %s (epochs %d..%d)", run_id, device, job.trainer.epochs_done + 1, spec.training.epochs)
        try:
            job.fit(on_epoch=recorder.add, should_stop=stop_requested)
        except TrainingCancelled as exc:
            if attempt.cancel_requested.is_set() and not attempt.lost.is_set():
                recorder.flush(checkpoint=False)  # it ends cancelled: keep the metrics so far
            elif not attempt.lost.is_set() and not exc.mid_epoch:
                recorder.flush()  # back to the queue from an epoch boundary: nothing is trained twice
            elif recorder.pending:  # mid-epoch: resumed from the last checkpoint
                log.info("run %s: %d epoch(s) after the last checkpoint will be trained again",
                         run_id, len(recorder.pending))
            raise
        except (TrainingError, ValueError, MemoryError, torch.cuda.OutOfMemoryError):
            with contextlib.suppress(Exception):  # it ends failed: keep the metrics so far
                recorder.flush(checkpoint=False)
            raise
        model = job.finish()
        evaluation = job.evaluate(spec.evaluation.samples, seed=spec.training.seed or 0)

        def store() -> None:
            with session_scope(url) as session:
                repository.succeed(session, run_id, attempt.owner, network=model.network.to_dict(),
                                   preprocessing=model.preprocessing(), weights=model.weights_blob(),
                                   results={"evaluation": evaluation})

        retry_transient(store, budget_s=budget, what=f"store the weights of run {run_id}")
        log.info("run %s succeeded", run_id)

    _finish(settings, run_id, attempt, device, work, should_stop)


class _EpochRecorder:
    """Buffers a run's finished epochs and writes them with a checkpoint (repository.record_epochs)
    at most every ``checkpoint_interval_s`` seconds, and always after the last epoch.

    What this keeps: every epoch's metrics row and event are written, in order, before the run
    succeeds, and while it runs the rows are exactly the epochs up to its checkpoint. So a run
    killed at any moment (SIGKILL included) resumes from the checkpoint and trains the lost
    epochs again bit for bit (an epoch's result depends only on the weights, the optimiser
    state, the seed and its number), writing their rows then. A run that ends cancelled or
    failed gets the rows of its unwritten epochs without a checkpoint (the metrics so far are
    kept); a worker shutting down between epochs writes them with one. What it costs: a kill
    loses at most the interval's worth of training, and live progress (epochs_done, SSE epoch
    events) arrives in batches when epochs are shorter than the interval. A cancel request is
    still seen within about the interval (each write returns the flag, and the daemon's lease
    renewal reads it), and a lost lease stops the writes (each is fenced by the lease owner).
    """

    def __init__(self, settings: Settings, run_id: uuid.UUID, attempt: Attempt, trainer: Trainer) -> None:
        self.url, self.budget = settings.sqlalchemy_url, settings.transient_retry_s
        self.interval_s = settings.checkpoint_interval_s
        self.run_id, self.attempt, self.trainer = run_id, attempt, trainer
        self.pending: list[dict[str, Any]] = []
        self.written_at = time.monotonic()

    def add(self, metrics: EpochMetrics) -> None:
        self.pending.append(metrics.to_dict())
        last = metrics.epoch >= self.trainer.config.epochs
        if last or time.monotonic() - self.written_at >= self.interval_s:
            self.flush()

    def flush(self, checkpoint: bool = True) -> None:
        """Write the pending epochs (with a checkpoint of the trainer as it is now: call it only at
        an epoch boundary, or with ``checkpoint=False`` for a run that is about to end)."""
        if not self.pending:
            return
        epochs = list(self.pending)
        blob = checkpoints.serialize(self.trainer.state_dict()) if checkpoint else None

        def write() -> bool:
            with session_scope(self.url) as session:
                return repository.record_epochs(session, self.run_id, self.attempt.owner, epochs, blob)

        first, last = epochs[0]["epoch"], epochs[-1]["epoch"]
        cancel = retry_transient(write, budget_s=self.budget, what=f"record epochs {first}..{last} of run {self.run_id}")
        self.pending.clear()
        self.written_at = time.monotonic()
        if cancel:
            self.attempt.cancel_requested.set()


def _finish(settings: Settings, run_id: uuid.UUID, attempt: Attempt, device: str,
            work: Callable[[], None], should_stop: Callable[[], bool]) -> None:
    """Run a job's work and map how it ends to the run's state (the failure policy above)."""
    url, budget = settings.sqlalchemy_url, settings.transient_retry_s

    def end(to: str, **values) -> bool:
        def write() -> bool:
            with session_scope(url) as session:
                return lifecycle.transition(session, run_id, to, expected=[RunStatus.RUNNING], owner=attempt.owner,
                                            values=values, event={k: v for k, v in values.items() if k == "error"} or None)
        return retry_transient(write, budget_s=budget, what=f"mark run {run_id} {to}")

    try:
        work()
    except repository.LeaseLost as exc:
        log.warning("%s; another worker carries on", exc)
    except TrainingCancelled:
        if attempt.lost.is_set():
            log.warning("run %s: lease lost; stopping (another worker carries on)", run_id)
        elif attempt.cancel_requested.is_set():
            end(RunStatus.CANCELLED, error=None)
            log.info("run %s cancelled", run_id)
        else:
            # The worker is shutting down: back to the queue, to resume from the checkpoint.
            if end(RunStatus.QUEUED, lease_owner=None, lease_expires_at=None, worker=None, dispatched_at=utcnow()):
                with session_scope(url) as session:
                    row = repository.get(session, run_id)
                    if row is not None:
                        reconciler.dispatch(settings, row)
                log.info("run %s handed back to the queue (worker shutting down)", run_id)
    except NonFiniteLossError as exc:
        end(RunStatus.FAILED, error=(
            f"training diverged: the loss became NaN or infinite in epoch {exc.epoch}, batch {exc.batch}; "
            "try a lower learning rate or stronger regularisation"))
    except torch.cuda.OutOfMemoryError as exc:
        end(RunStatus.FAILED, error=f"out of memory on {device}: {str(exc)[:500]}")
    except MemoryError:
        end(RunStatus.FAILED, error=f"out of memory on {device}")
    except (TrainingError, ValueError) as exc:
        end(RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        if is_transient(exc):
            raise
        log.exception("run %s failed unexpectedly", run_id)
        end(RunStatus.FAILED, error=f"internal error: {type(exc).__name__}: {str(exc)[:500]}")
