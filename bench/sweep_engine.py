"""Sweep engine: training many UCI-sized dropout nets stacked vs one after another.

The network of the MC dropout paper's UCI protocol (13 inputs -> Dense(50, ReLU) -> 1, input
and hidden dropout 0.05, Adam, batch 128) on 80 % of a bostonHousing training split (364 rows).
Baseline: ``service.ml.training.Trainer`` + ``fit``, one net after another (build_network
included). Stacked: ``service.ml.sweep.train_stacked`` on M nets at once (StackedMLP
construction included). Both in this run, on this machine, with torch's current thread count.

Run alone: ``python -m bench.sweep_engine [--epochs 100] [--nets 1 12 60 240] [--baseline-nets 2]
[--repeats 2]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import Section
from service.ml.data import Standardizer
from service.ml.nets import NetworkSpec, build_network
from service.ml.sweep import NetConfig, StackedMLP, train_stacked, weight_decay_from_prior
from service.ml.training import Trainer, TrainingConfig, fit

BOSTON = Path(__file__).resolve().parents[2] / "shared" / "uci" / "bostonHousing"
DROPOUT = 0.05
BATCH_SIZE = 128
HIDDEN = 50


def boston_rows() -> tuple[np.ndarray, np.ndarray, str]:
    """Standardised inputs and target of the first 80 % of split 0's training rows (364 rows)."""
    if (BOSTON / "data.txt").exists():
        data = np.loadtxt(BOSTON / "data.txt")
        features = np.loadtxt(BOSTON / "index_features.txt", dtype=int)
        target = int(np.loadtxt(BOSTON / "index_target.txt"))
        train = np.loadtxt(BOSTON / "index_train_0.txt", dtype=int)
        rows = train[: int(round(0.8 * len(train)))]
        x, y = data[rows][:, features], data[rows, target]
        source = f"bostonHousing split 0, {len(rows)} rows"
    else:  # same shape, synthetic, when ../shared/uci is absent
        generator = np.random.default_rng(0)
        x, y = generator.normal(size=(364, 13)), generator.normal(size=364)
        source = "synthetic 364 x 13 (bostonHousing not found)"
    x = Standardizer.fit(x).transform(x).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    return x, y, source


def net_config(seed: int, n_rows: int) -> NetConfig:
    weight_decay = weight_decay_from_prior(1e-2, DROPOUT, n_rows, tau=1.0)
    return NetConfig(dropout=DROPOUT, input_dropout=DROPOUT, weight_decay=weight_decay,
                     learning_rate=1e-3, seed=seed)


def time_trainer(x: np.ndarray, y: np.ndarray, nets: int, epochs: int) -> float:
    started = time.perf_counter()
    for seed in range(nets):
        cfg = net_config(seed, len(x))
        spec = NetworkSpec(x.shape[1], 1, (HIDDEN,), (DROPOUT,), input_dropout=DROPOUT)
        training = TrainingConfig(epochs=epochs, batch_size=BATCH_SIZE, learning_rate=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, seed=seed)
        fit(Trainer(build_network(spec, seed=seed), "regression", x, y, None, None, training))
    return time.perf_counter() - started


def time_stacked(x: np.ndarray, y: np.ndarray, nets: int, epochs: int) -> float:
    configs = [net_config(seed, len(x)) for seed in range(nets)]
    rows = [np.arange(len(x))] * nets
    x_tensor, y_tensor = torch.as_tensor(x), torch.as_tensor(y)
    started = time.perf_counter()
    model = StackedMLP.from_configs(x.shape[1], (HIDDEN,), configs)
    train_stacked(model, x_tensor, y_tensor, rows, configs, epochs=epochs, batch_size=BATCH_SIZE)
    return time.perf_counter() - started


def run(quick: bool = False, epochs: int | None = None, stack_sizes: list[int] | None = None,
        baseline_nets: int | None = None, repeats: int | None = None) -> list[Section]:
    """Best of ``repeats`` timings per row. The machine is shared and its load changes by the
    minute, so the baseline is timed again before every stacked timing and its best is kept:
    the minimum is the least disturbed estimate of each."""
    epochs = epochs or (20 if quick else 100)
    stack_sizes = stack_sizes or ([1, 12, 60] if quick else [1, 12, 60, 240])
    baseline_nets = baseline_nets or 2
    repeats = repeats or (1 if quick else 2)
    x, y, source = boston_rows()
    time_stacked(x, y, 2, 1)  # warm-up (first-call allocations, kernels)
    baseline_times: list[float] = []
    stacked_times: dict[int, list[float]] = {nets: [] for nets in stack_sizes}
    for _ in range(repeats):
        for nets in stack_sizes:
            baseline_times.append(time_trainer(x, y, baseline_nets, epochs))
            stacked_times[nets].append(time_stacked(x, y, nets, epochs))
    baseline_seconds = min(baseline_times)
    baseline_rate = baseline_nets / baseline_seconds
    rows: list[list[object]] = [["Trainer, one after another", baseline_nets, epochs, baseline_seconds,
                                 baseline_rate, baseline_nets * epochs / baseline_seconds, 1.0]]
    for nets in stack_sizes:
        seconds = min(stacked_times[nets])
        rate = nets / seconds
        rows.append([f"train_stacked, M = {nets}", nets, epochs, seconds, rate, nets * epochs / seconds,
                     rate / baseline_rate])
    return [Section(
        key="sweep-engine",
        title="Sweep engine: M dropout MLPs trained stacked vs one after another",
        baseline=(f"service.ml.training.Trainer + fit per net; {source}; 13 -> 50 (ReLU) -> 1, "
                  f"input and hidden dropout {DROPOUT}, batch {BATCH_SIZE}, Adam"),
        columns=["engine", "nets", "epochs", "seconds", "nets/s", "net-epochs/s", "speed-up"],
        rows=rows,
        notes=[f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
               f"{os.cpu_count()} CPUs; same run, same machine; best of {repeats} per stacked row and of "
               f"{len(baseline_times)} baseline timings (build included); "
               f"load average {os.getloadavg()[0]:.2f} at the end."],
    )]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per net (default 100; 20 with --quick)")
    parser.add_argument("--nets", type=int, nargs="+", default=None, help="stack sizes M (default 1 12 60 240)")
    parser.add_argument("--baseline-nets", type=int, default=None,
                        help="nets trained one by one per baseline timing (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per row, best kept (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and nets")
    args = parser.parse_args()
    for section in run(args.quick, args.epochs, args.nets, args.baseline_nets, args.repeats):
        print(section.markdown())


if __name__ == "__main__":
    main()
