"""GPU benchmarks: items 1, 2 and 6 and the sweep engine, on CUDA (``make bench-gpu``).

1-2. The MC engine vs a plain loop of T forwards, and its GFLOP/s vs a CUDA matmul
     (bench.mc_engine, run on the GPU; float32, TF32 as torch's default leaves it).
6.   Training through the service (``mcdrop up``, a worker training on the GPU) and the service's
     Trainer in this process vs a plain PyTorch loop on the GPU.
     Sweep engine: ``service.ml.sweep.train_stacked`` vs the Trainer one net after another, small.

On a machine without CUDA it prints one "no CUDA device" line and exits 0. ``make bench`` (the
runner in bench/__main__.py) also calls :func:`run` when CUDA is present.

``python -m bench.gpu [--quick]``; ``--device cpu`` runs the same code on the CPU (a smoke test
of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

from bench.report import Section

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): GPU benchmarks skipped"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sweep_section(quick: bool, device: torch.device) -> Section:
    """Stacked vs sequential training of UCI-sized nets on ``device`` (small)."""
    if importlib.util.find_spec("service.ml.sweep") is None:
        return Section(key="gpu-sweep-engine", title="Sweep engine on the GPU", baseline="—", columns=["note"],
                       rows=[["service/ml/sweep.py does not exist: skipped"]])
    from bench.sweep_engine import BATCH_SIZE, DROPOUT, HIDDEN, boston_rows, net_config
    from service.ml.nets import NetworkSpec, build_network
    from service.ml.sweep import StackedMLP, train_stacked
    from service.ml.training import Trainer, TrainingConfig, fit

    epochs = 5 if quick else 20
    baseline_nets = 2
    stack_sizes = [12] if quick else [12, 60, 240]
    x, y, source = boston_rows()

    def sequential(nets: int) -> float:
        _sync(device)
        started = time.perf_counter()
        for seed in range(nets):
            config = net_config(seed, len(x))
            spec = NetworkSpec(x.shape[1], 1, (HIDDEN,), (DROPOUT,), input_dropout=DROPOUT)
            training = TrainingConfig(epochs=epochs, batch_size=BATCH_SIZE, learning_rate=config.learning_rate,
                                      weight_decay=config.weight_decay, seed=seed)
            fit(Trainer(build_network(spec, seed=seed), "regression", x, y, None, None, training, device=device))
        _sync(device)
        return time.perf_counter() - started

    def stacked(nets: int) -> float:
        configs = [net_config(seed, len(x)) for seed in range(nets)]
        rows = [np.arange(len(x))] * nets
        x_tensor, y_tensor = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
        _sync(device)
        started = time.perf_counter()
        model = StackedMLP.from_configs(x.shape[1], (HIDDEN,), configs).to(device)
        train_stacked(model, x_tensor, y_tensor, rows, configs, epochs=epochs, batch_size=BATCH_SIZE)
        _sync(device)
        return time.perf_counter() - started

    stacked(2)  # warm-up: kernels, allocator
    sequential(1)
    base_seconds = sequential(baseline_nets)
    base_rate = baseline_nets / base_seconds
    table: list[list[object]] = [["Trainer, one after another", baseline_nets, base_seconds, base_rate, 1.0]]
    for nets in stack_sizes:
        seconds = stacked(nets)
        table.append([f"train_stacked, M = {nets}", nets, seconds, nets / seconds, nets / seconds / base_rate])
    return Section(
        key="gpu-sweep-engine",
        title=f"Sweep engine on {device.type.upper()}: M nets stacked vs one after another ({epochs} epochs)",
        baseline=f"service.ml.training.Trainer + fit per net on the same device; {source}; 13 -> 50 -> 1, "
                 f"dropout {DROPOUT}, batch {BATCH_SIZE}, Adam",
        columns=["engine", "nets", "seconds", "nets/s", "speed-up"],
        rows=table,
    )


def run(quick: bool = False, device: str | torch.device = "cuda") -> list[Section]:
    """All GPU sections on ``device``; each part that fails becomes a one-row note, not a crash."""
    from bench import mc_engine, training_throughput

    device = torch.device(device)
    threads = torch.get_num_threads()
    parts = [
        ("MC engine (items 1-2)",
         lambda: mc_engine.run(quick, device, threads=[(f"default ({threads})", threads)])),
        ("training (item 6)", lambda: [training_throughput.device_section(quick, device)]),
        ("sweep engine", lambda: [sweep_section(quick, device)]),
    ]
    sections: list[Section] = []
    for name, part in parts:
        try:
            produced = part()
        except Exception as exc:  # one broken part must not hide the others
            produced = [Section(key="gpu-error", title=f"GPU {name}: failed", baseline="—", columns=["error"],
                                rows=[[f"{type(exc).__name__}: {exc}"]])]
        for section in produced:
            if not section.key.startswith("gpu-"):
                section.key = f"gpu-{section.key}"
            sections.append(section)
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and epochs")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test of this script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    else:
        print(f"(smoke test on {device}: not a GPU benchmark)\n")
    for section in run(args.quick, device):
        print(section.markdown())


if __name__ == "__main__":
    main()
