"""The job logic behind the tasks: claim the row, train with service.ml, persist, mark state."""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable

import torch

from service import queue
from service.config import Settings
from service.datasets import service as datasets
from service.db import session_scope
from service.ml.training import EpochMetrics, TrainingCancelled, TrainingError
from service.runs import repository
from service.runs.modelling import prepare_training
from service.runs.models import RunStatus
from service.runs.schemas import RunCreate

log = logging.getLogger(__name__)

WORKER_NAME = f"{socket.gethostname()}:{__import__('os').getpid()}"


def choose_device(settings: Settings, requested: str | None) -> str:
    """The device a run trains on: the run may insist on cpu; cuda whenever it is there."""
    if requested == "cpu" or settings.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda" or settings.device == "cuda":
        raise TrainingError("the run asks for CUDA but this worker has no CUDA device")
    return "cpu"


def train_run(run_id: uuid.UUID, settings: Settings, should_stop: Callable[[], bool] = lambda: False) -> None:
    url = settings.sqlalchemy_url
    with session_scope(url) as session:
        row = repository.get(session, run_id)
        if row is None:
            log.warning("run %s does not exist; message dropped", run_id)
            return
        if row.status != RunStatus.QUEUED:
            log.info("run %s is already %s; nothing to do", run_id, row.status)
            return
        spec_data = {key: value for key, value in row.spec.items() if key != "task"}
        try:
            device = choose_device(settings, spec_data.get("device"))
        except TrainingError as exc:
            repository.fail(session, run_id, str(exc))
            return
        if not repository.claim(session, run_id, worker=WORKER_NAME, device=device):
            log.info("run %s was claimed by another worker", run_id)
            return
        spec = RunCreate.model_validate({**spec_data, "dataset_id": row.dataset_id})
        dataset = datasets.load_arrays(session, row.dataset_id)

    log.info("training run %s on %s (%d epochs)", run_id, device, spec.training.epochs)

    def record(metrics: EpochMetrics) -> None:
        with session_scope(url) as session:
            repository.record_epoch(session, run_id, metrics.to_dict())

    try:
        job = prepare_training(dataset, spec, device=device)
        job.fit(on_epoch=record, should_stop=should_stop)
        if should_stop() and job.trainer.epochs_done < spec.training.epochs:
            raise TrainingCancelled(job.trainer.epochs_done, mid_epoch=False)
        model = job.finish()
        with session_scope(url) as session:
            repository.succeed(
                session, run_id, network=model.network.to_dict(),
                preprocessing=model.preprocessing(), weights=model.weights_blob(),
            )
        log.info("run %s succeeded", run_id)
    except TrainingCancelled:
        # The worker is shutting down: hand the run back so another worker (or this one after
        # a restart) trains it. Its metrics so far are kept.
        with session_scope(url) as session:
            repository.requeue(session, run_id)
        queue.enqueue_training(settings, run_id, spec.device)
        log.info("run %s handed back to the queue (worker shutting down)", run_id)
    except (TrainingError, ValueError) as exc:
        _fail(url, run_id, f"{type(exc).__name__}: {exc}")
    except torch.cuda.OutOfMemoryError as exc:
        _fail(url, run_id, f"out of memory on {device}: {exc}")
    except MemoryError:
        _fail(url, run_id, "out of memory")
    except Exception as exc:
        log.exception("run %s failed unexpectedly", run_id)
        _fail(url, run_id, f"internal error: {type(exc).__name__}: {exc}")


def _fail(url: str, run_id: uuid.UUID, error: str) -> None:
    log.warning("run %s failed: %s", run_id, error)
    with session_scope(url) as session:
        repository.fail(session, run_id, error)
