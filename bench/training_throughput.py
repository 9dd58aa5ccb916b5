"""6. Training throughput: through the service vs the same training in a plain PyTorch loop.

Through the service = the real path: a real ``mcdrop up`` (API + worker, embedded mode: SQLite
and the filesystem broker in a temporary folder, a free port), a digits dataset and a textbook
run created over HTTP, trained by the worker; samples/s from the run's per-epoch ``duration_s``
(pure training) and from ``started_at`` → ``finished_at`` (everything: checkpoints, database
writes, the final evaluation and the weights). Also the service's ``Trainer`` called in this
process (the worker's training code without the worker around it).

Baseline: a minimal hand-written loop in this process — ``nn.Sequential``, Adam, index batching
without a DataLoader — with the same data (the service's split and standardisation), epochs and
batch size, and the same thread count as the worker (under ``mcdrop up``: the usable cores less
one for the API); a full run repeats it at torch's own default (every usable core) on both sides.

``python -m bench.training_throughput [--quick]`` prints the section.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.report import Section
from service.tuning import usable_cores, worker_torch_threads

TARGET = 0.9
BATCH_SIZE = 32
SEED = 0
TEXTBOOK_MODEL = {"hidden_layers": [64, 64], "dropout": 0.5}
# What `mcdrop up`'s worker trains with by default: the usable cores less one for the API (at least 1).
WORKER_THREADS = worker_torch_threads(0, 1, usable_cores(), beside_api=True)
ALL_CORES = usable_cores()  # torch's own default


def training_spec(epochs: int) -> dict:
    return {"epochs": epochs, "batch_size": BATCH_SIZE, "optimizer": "adam", "learning_rate": 0.001,
            "weight_decay": 0, "l1": 0, "validation_fraction": 0.2, "seed": SEED}


def epochs_for(quick: bool) -> int:
    return 5 if quick else 30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def service_job(epochs: int, device: str | torch.device = "cpu"):
    """The worker's own set-up (service.runs.modelling.prepare_training) for a digits textbook run."""
    from service.ml.data import load_builtin
    from service.runs.modelling import prepare_training
    from service.runs.schemas import RunCreate

    spec = RunCreate.model_validate({"dataset_id": str(uuid.uuid4()), "model": TEXTBOOK_MODEL,
                                     "training": training_spec(epochs)})
    return prepare_training(load_builtin("digits"), spec, device=str(device))


def plain_loop(x: Tensor, y: Tensor, epochs: int, batch_size: int = BATCH_SIZE, seed: int = SEED) -> float:
    """The baseline: seconds for ``epochs`` of minibatch Adam on the textbook net (x, y on the device)."""
    device = x.device
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(64, int(y.max()) + 1),
    ).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    shuffle = torch.Generator().manual_seed(seed)
    net.train()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=shuffle).to(device)
        for start in range(0, len(x), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(net(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    synchronize(device)
    return time.perf_counter() - started


@dataclass
class Baseline:
    samples_per_s: float
    spread: str  # min..max over the repetitions


def baseline(x: Tensor, y: Tensor, epochs: int, repetitions: int) -> Baseline:
    rates = [len(x) * epochs / plain_loop(x, y, epochs) for _ in range(repetitions)]
    return Baseline(statistics.median(rates), f"{min(rates):,.0f}..{max(rates):,.0f}")


def in_process_trainer(
    epochs: int, device: str | torch.device = "cpu", repetitions: int = 3
) -> tuple[float, float, int]:
    """The service's Trainer in this process, median over ``repetitions`` fresh jobs:
    (sum of epoch duration_s, wall seconds of fit, training rows)."""
    device = torch.device(device)
    measured = []
    for _ in range(repetitions):
        job = service_job(epochs, device)
        synchronize(device)
        started = time.perf_counter()
        history = job.fit()
        synchronize(device)
        measured.append((sum(m.duration_s for m in history), time.perf_counter() - started))
    return (statistics.median(m[0] for m in measured), statistics.median(m[1] for m in measured),
            len(job.trainer.x_train))


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class ServiceRun:
    training_s: float  # sum of the per-epoch duration_s
    wall_s: float  # started_at -> finished_at
    submit_to_done_s: float  # POST /v1/runs -> the client saw "succeeded"
    epochs: int
    device: str | None


def through_the_service(epochs: int, timeout_s: float, worker_threads: int | None = None,
                        repetitions: int = 3, device: str = "cpu") -> ServiceRun:
    """``repetitions`` runs, one after another, through one fresh ``mcdrop up``: the median of each
    measure (as the plain loop's). ``worker_threads`` sets MCDROP_WORKER_TORCH_THREADS; ``device``
    is the runs' ``device`` (cpu, or cuda for the worker's GPU)."""
    import httpx

    from bench.server import embedded_server, wait_until_done

    env = {"MCDROP_AUTH": "off"}  # embedded on loopback: every caller is tenant "default"
    if worker_threads is not None:
        env["MCDROP_WORKER_TORCH_THREADS"] = str(worker_threads)
    measured: list[ServiceRun] = []
    with embedded_server(env) as base, httpx.Client(base_url=base, timeout=30) as http:
        dataset = http.post("/v1/datasets", json={"name": "digits", "builtin": "digits"})
        dataset.raise_for_status()
        for _ in range(repetitions):
            submitted = time.perf_counter()
            run = http.post("/v1/runs", json={"dataset_id": dataset.json()["id"], "model": TEXTBOOK_MODEL,
                                              "training": training_spec(epochs), "device": device})
            run.raise_for_status()
            run_id = run.json()["id"]
            body = wait_until_done(http, f"/v1/runs/{run_id}", timeout_s=timeout_s, poll_s=0.5)
            done = time.perf_counter()
            if body["status"] != "succeeded":
                raise RuntimeError(f"the run ended {body['status']}: {body.get('error')}")
            metrics = http.get(f"/v1/runs/{run_id}/metrics").json()["items"]
            if len(metrics) != epochs:
                raise RuntimeError(f"expected {epochs} epochs of metrics, got {len(metrics)}")
            wall = (_timestamp(body["finished_at"]) - _timestamp(body["started_at"])).total_seconds()
            measured.append(ServiceRun(sum(m["duration_s"] for m in metrics), wall, done - submitted, epochs,
                                       body.get("device")))
    return ServiceRun(statistics.median(m.training_s for m in measured), statistics.median(m.wall_s for m in measured),
                      statistics.median(m.submit_to_done_s for m in measured), epochs, measured[0].device)


def device_section(quick: bool, device: str | torch.device) -> Section:
    """Item 6 on ``device`` (used by bench.gpu): the plain loop in this process vs the service's
    Trainer in this process and vs runs through ``mcdrop up`` whose worker trains on ``device``."""
    device = torch.device(device)
    epochs = epochs_for(quick)
    job = service_job(epochs, device)
    x, y = job.trainer.x_train, job.trainer.y_train
    plain_loop(x, y, 1)  # warm-up (CUDA context, kernels)
    before = baseline(x, y, epochs, 3)
    training_s, fit_s, rows = in_process_trainer(epochs, device)
    service = through_the_service(epochs, 120 if quick else 600, device=device.type)
    after = baseline(x, y, epochs, 3)
    base = statistics.median([before.samples_per_s, after.samples_per_s])

    def row(path: str, seconds: float, counts: bool) -> list[object]:
        rate = rows * epochs / seconds
        return [path, rate, rate / base, ("yes" if rate / base >= TARGET else "no") if counts else "—"]

    table = [["plain loop in this process (median of before/after)", base, 1.0, "—"],
             row("service Trainer in this process, Σ epoch duration_s", training_s, False),
             row("service Trainer in this process, fit() wall", fit_s, False),
             row("service via HTTP + worker, Σ epoch duration_s (pure training)", service.training_s, True),
             row("service via HTTP + worker, started_at → finished_at (everything)", service.wall_s, True)]
    return Section(
        key="training-device",
        title=f"6. Training: through the service and its Trainer vs a plain PyTorch loop, on {device.type.upper()}",
        baseline="a minimal nn.Sequential + Adam loop with index batching in this process, same data, epochs, "
                 "batch size, device",
        columns=["path", "samples/s", "vs plain loop", f">= {TARGET}x"],
        rows=table,
        target=f">= {TARGET}x of the plain loop's samples/s (both service measures)",
        met=all(r[3] == "yes" for r in table if r[3] != "—"),
        notes=[f"digits textbook net, {rows} training rows, {epochs} epochs, batch {BATCH_SIZE}; plain loop runs "
               f"{before.spread} (before) and {after.spread} (after) samples/s. Through the service: a real "
               f"`mcdrop up` (SQLite, filesystem broker), runs created over HTTP with \"device\": "
               f"\"{device.type}\", the median of 3; they trained on {service.device}."],
    )


def run(quick: bool = False) -> list[Section]:
    epochs = epochs_for(quick)
    timeout_s = 120 if quick else 600
    with _threads(WORKER_THREADS):
        job = service_job(epochs)
        x, y = job.trainer.x_train, job.trainer.y_train
        rows = len(x)
        plain_loop(x, y, 1)  # warm-up
        before = baseline(x, y, epochs, 3)
        trainer_s, _, _ = in_process_trainer(epochs)
        service = through_the_service(epochs, timeout_s)
        after = baseline(x, y, epochs, 3)
    single: tuple[Baseline, ServiceRun] | None = None
    if not quick and WORKER_THREADS != ALL_CORES:  # the same with torch's default, all cores, on both sides
        with _threads(ALL_CORES):
            single_service = through_the_service(epochs, timeout_s, worker_threads=ALL_CORES)
            single = (baseline(x, y, epochs, 5), single_service)
    base = statistics.median([before.samples_per_s, after.samples_per_s])
    samples = rows * epochs

    def row(path: str, seconds: float, counts: bool, reference: float = base) -> list[object]:
        rate = samples / seconds
        verdict = ("yes" if rate / reference >= TARGET else "no") if counts else "—"
        return [path, seconds, rate, rate / reference, verdict]

    table = [
        [f"plain loop in this process, {WORKER_THREADS} thread{'' if WORKER_THREADS == 1 else 's'} (median of "
         "before/after)", samples / base, base,
         1.0, "—"],
        row("service Trainer in this process, Σ epoch duration_s", trainer_s, False),
        row("service via HTTP + worker, Σ epoch duration_s (pure training)", service.training_s, True),
        row("service via HTTP + worker, started_at → finished_at (everything)", service.wall_s, True),
        row("service via HTTP + worker, submit → client sees succeeded", service.submit_to_done_s, False),
    ]
    met = all(r[4] == "yes" for r in table if r[4] != "—")
    notes = [
        f"Digits, the README's textbook net (64-64-64-10, dropout 0.5), {rows} training rows (the service's "
        f"80/20 split, seed {SEED}), {epochs} epochs, batch {BATCH_SIZE}, Adam 1e-3; {WORKER_THREADS} torch "
        f"thread{'' if WORKER_THREADS == 1 else 's'} here and in the worker (its default under `mcdrop up`: the "
        f"{ALL_CORES} usable cores less one for the API); the runs trained on {service.device}. Through the service: "
        "the median of 3 runs, one after another, through one `mcdrop up`, for each measure.",
        f"Plain loop: {before.spread} samples/s over 3 runs before the server, {after.spread} after; the machine "
        "is shared, so the spread is part of the answer.",
        "What the service does on top of the plain loop. Σ duration_s (the epochs alone): per batch a "
        "finite-loss check and the accuracy count (each a host sync), per epoch the validation pass on the "
        "held-out 20%. started_at → finished_at adds, around the epochs: claiming the run and loading the "
        "dataset from the database, the split and standardisation, the epoch records — every epoch's metrics "
        "row and SSE event, epochs_done and a checkpoint (weights, Adam state, RNG) in one transaction at most "
        "every MCDROP_CHECKPOINT_INTERVAL_S (1 s) and after the last epoch, instead of one per epoch — the "
        "MC-dropout evaluation on the held-out rows (T = 100) and storing the weights with the run's success. "
        "The worker pays a fresh process's one-time costs (torch.optim's first import of torch._dynamo, ~1 s "
        "here; first use of each op) at start-up, before it takes a run (workers.runners.warm_up), as the "
        "plain loop pays them in its warm-up epoch. submit → succeeded adds queueing (and the end of the worker's "
        "start-up, if the run comes first) "
        "and the client's 0.5 s polling.",
    ]
    overheads = ([(f"{WORKER_THREADS} thread{'' if WORKER_THREADS == 1 else 's'}", service)]
                 + ([(f"{ALL_CORES} threads", single[1])] if single else []))
    notes.append("Outside the epochs (started_at → finished_at minus Σ duration_s): " + "; ".join(
        f"{label}: {run.wall_s - run.training_s:.2f} s, {1e3 * (run.wall_s - run.training_s) / run.epochs:.0f} ms "
        "per epoch" for label, run in overheads) + ".")
    if single is not None:
        single_base, single_service = single
        reference = single_base.samples_per_s
        table += [
            [f"plain loop in this process, {ALL_CORES} threads (median of 5)", samples / reference, reference, 1.0,
             "—"],
            row(f"service via HTTP + worker with MCDROP_WORKER_TORCH_THREADS={ALL_CORES}, Σ epoch duration_s",
                single_service.training_s, False, reference),
            row(f"service via HTTP + worker with MCDROP_WORKER_TORCH_THREADS={ALL_CORES}, started_at → finished_at",
                single_service.wall_s, False, reference),
        ]
        notes.append(f"The last three rows (ratios against the {ALL_CORES}-thread loop) repeat the comparison with "
                     f"torch's own default, {ALL_CORES} threads (every usable core), on both sides. The worker "
                     "leaves a core to the API by default: with more threads than free cores, every parallel region "
                     "waits for a time slice whenever a neighbour holds a core, which can slow training down "
                     "several times (service.tuning.worker_torch_threads).")
    elif WORKER_THREADS != ALL_CORES:
        notes.append(f"A full run (without --quick) repeats the comparison with {ALL_CORES} threads on both sides.")
    return [Section(
        key="training",
        title="6. Training throughput: through the service vs a plain PyTorch loop",
        baseline=("a minimal hand-written loop in this process (nn.Sequential, Adam, index batching, no "
                  "DataLoader), same data, epochs, batch size and thread count as the worker"),
        columns=["path", "seconds", "samples/s", "vs plain loop", f">= {TARGET}x"],
        rows=table,
        target=f">= {TARGET}x of the plain loop's samples/s (both service measures, the worker's default threads)",
        met=met,
        notes=notes,
    )]


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for section in run(quick=args.quick):
        print(section.markdown())
