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

import logging
import uuid
from collections.abc import Callable

import torch

from service.config import Settings
from service.datasets import service as datasets
from service.db import session_scope, utcnow
from service.jobs import reconciler, webhooks
from service.jobs.transient import is_transient, retry_transient
from service.ml.training import EpochMetrics, NonFiniteLossError, TrainingCancelled, TrainingError
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
        if kind == "sweep":
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
        dataset = datasets.load_arrays(session, row.dataset_id)
        stored = repository.checkpoint(session, run_id)
        return (row.kind, {**spec_data, "dataset_id": row.dataset_id}, dataset,
                stored.state if stored is not None else None, device)


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
    """A run: train (from the last checkpoint), record every epoch, evaluate, store the weights."""
    url, budget = settings.sqlalchemy_url, settings.transient_retry_s

    def stop_requested() -> bool:
        return should_stop() or attempt.lost.is_set() or attempt.cancel_requested.is_set()

    def work() -> None:
        job = prepare_training(dataset, spec, device=device)

        def record(metrics: EpochMetrics) -> None:
            blob = checkpoints.serialize(job.trainer.state_dict())

            def write() -> bool:
                with session_scope(url) as session:
                    return repository.record_epoch(session, run_id, attempt.owner, metrics.to_dict(), blob)

            if retry_transient(write, budget_s=budget, what=f"record epoch {metrics.epoch} of run {run_id}"):
                attempt.cancel_requested.set()

        if checkpoint_blob is not None:
            job.trainer.load_state_dict(checkpoints.deserialize(checkpoint_blob, device))
            log.info("run %s resumes after epoch %d", run_id, job.trainer.epochs_done)
        log.info("training run %s on %s (epochs %d..%d)", run_id, device, job.trainer.epochs_done + 1, spec.training.epochs)
        job.fit(on_epoch=record, should_stop=stop_requested)
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
