"""1-2. The MC dropout engine: speed against a plain loop, and GFLOP/s against a plain matmul.

1. ``service.ml.mc.sample_outputs`` (T passes as one batched forward, the part before the first
   dropout computed once, masks from a private generator) against ``sample_outputs_loop``
   (T separate forwards), T = 100, batch 1 and 64.
2. The engine's achieved GFLOP/s (Linear FLOPs counted analytically: 2·m·n·k per layer over the
   T passes, the cached prefix once) against ``torch.matmul`` of a comparable shape
   ``[T·B, width] @ [width, width]`` measured in the same run, float32, same threads.

Both networks: the README's textbook classifier (64 → 64 ReLU → dropout 0.5 → 64 ReLU →
dropout 0.5 → 10) and the UCI regression net (13 → dropout 0.05 → 50 ReLU → dropout 0.05 → 1).
Both thread settings: 1 thread (how the API serves) and torch's default.

Also here: a profile of where the engine's time goes (2c) and the effect of the glibc malloc
tuning (2d). The bench calls ``service.tuning.tune_allocator()`` first, as the API and the
workers do at start-up, so sections 1, 2 and 2c measure the engine as it is served; mallopt is
process-wide, so under ``python -m bench`` the modules after this one run tuned too. Section 2d
compares two fresh processes, one left at glibc's defaults and one tuned.

(The bench-only PROTOTYPE engine that used to be measured here is superseded: its techniques —
16-bit mask lanes, one random bit per unit for p = 0.5, 1/keep folded into the next Linear,
in-place activations and masks, a narrow last layer as W @ hᵀ — are now in
service.ml.mc.sample_outputs, which every row here measures.)

``python -m bench.mc_engine [--quick]`` prints the sections.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bench.report import Section
from service.ml.mc import sample_outputs, sample_outputs_loop
from service.ml.nets import NetworkSpec, build_network
from service.tuning import tune_allocator

SAMPLES = 100  # T
BATCHES = (1, 64)
SPEEDUP_TARGET = 15.0
PEAK_FRACTION_TARGET = 0.5
SEED = 7


@dataclass(frozen=True)
class Network:
    name: str
    spec: NetworkSpec

    @property
    def width(self) -> int:
        return max(self.spec.hidden_layers)


NETWORKS = (
    Network("textbook 64-64-64-10, p=0.5", NetworkSpec(64, 10, (64, 64), (0.5, 0.5))),
    Network("UCI 13-50-1, p=0.05", NetworkSpec(13, 1, (50,), (0.05,), input_dropout=0.05)),
)

DEFAULT_THREADS = torch.get_num_threads()  # torch's default, read at import (before anything changes it)


def thread_settings() -> list[tuple[str, int]]:
    """(label, threads): 1 thread as the API serves, and torch's default if it differs."""
    settings = [("1", 1)]
    if DEFAULT_THREADS != 1:
        settings.append((f"default ({DEFAULT_THREADS})", DEFAULT_THREADS))
    return settings


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def seconds_per_call(fn: Callable[[], object], *, quick: bool, sync: Callable[[], None] = lambda: None) -> float:
    """Median over timed blocks of the mean time per call (warm-up and calibration first).

    Stops adding blocks once a time budget is spent (a loaded machine can make calls 100x
    slower than calibrated), keeping at least one block in quick mode and three otherwise.
    """
    block_s, blocks, budget_s, least = (0.02, 3, 0.4, 1) if quick else (0.1, 9, 3.0, 3)
    begun = time.perf_counter()
    fn()
    sync()
    started, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - started < block_s / 2:
        fn()
        calls += 1
    sync()
    per_call = (time.perf_counter() - started) / calls
    repetitions = max(1, int(block_s / max(per_call, 1e-9)))
    times: list[float] = []
    while len(times) < blocks and (len(times) < least or time.perf_counter() - begun < budget_s):
        started = time.perf_counter()
        for _ in range(repetitions):
            fn()
        sync()
        times.append((time.perf_counter() - started) / repetitions)
    return statistics.median(times)


def linear_flops(net: nn.Sequential, batch: int, samples: int) -> int:
    """2·m·n·k per Linear: once for the layers before the first sampled dropout (the cached
    prefix), ``samples`` times for the others."""
    flops, passes = 0, 1
    for module in net:
        if isinstance(module, nn.Dropout) and module.p > 0:
            passes = samples
        elif isinstance(module, nn.Linear):
            flops += 2 * passes * batch * module.in_features * module.out_features
    return flops


def matmul_gflops(rows: int, width: int, device: torch.device, *, quick: bool) -> float:
    """float32 ``[rows, width] @ [width, width]`` with ``torch.matmul``."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, width, generator=generator, device=device)
    b = torch.randn(width, width, generator=generator, device=device)
    seconds = seconds_per_call(lambda: torch.matmul(a, b), quick=quick, sync=synchronizer(device))
    return 2 * rows * width * width / seconds / 1e9


def load_average() -> str:
    try:
        return "/".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "?"


# -- measurements ------------------------------------------------------------------------------
@dataclass
class Measurement:
    network: Network
    threads: str
    batch: int
    engine_s: float
    loop_s: float
    flops: int
    matmul_gflops: float

    @property
    def speedup(self) -> float:
        return self.loop_s / self.engine_s

    def gflops(self, seconds: float) -> float:
        return self.flops / seconds / 1e9


def measure(quick: bool = False, device: str | torch.device = "cpu",
            threads: list[tuple[str, int]] | None = None) -> list[Measurement]:
    device = torch.device(device)
    sync = synchronizer(device)
    results = []
    for label, count in threads or thread_settings():
        with torch_threads(count):
            for network in NETWORKS:
                net = build_network(network.spec, seed=0).to(device)
                generator = torch.Generator().manual_seed(1)
                for batch in BATCHES:
                    x = torch.randn(batch, network.spec.n_inputs, generator=generator).to(device)
                    engine = seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED), quick=quick, sync=sync)
                    loop = seconds_per_call(lambda: sample_outputs_loop(net, x, SAMPLES, SEED), quick=quick, sync=sync)
                    results.append(Measurement(
                        network, label, batch, engine, loop, linear_flops(net, batch, SAMPLES),
                        matmul_gflops(SAMPLES * batch, network.width, device, quick=quick),
                    ))
    return results


def profile(
    device: torch.device, batch: int = 64, calls: int = 20, top: int = 6
) -> tuple[list[list[object]], list[str]]:
    """Self CPU time per aten op for the engine (1 thread): where the time goes.

    Returns the table rows (top ops) and one summary line per network.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows: list[list[object]] = []
    summary: list[str] = []
    with torch_threads(1):
        for network in NETWORKS:
            net = build_network(network.spec, seed=0).to(device)
            x = torch.randn(batch, network.spec.n_inputs, generator=torch.Generator().manual_seed(3)).to(device)
            for _ in range(3):
                sample_outputs(net, x, SAMPLES, SEED)
            with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
                for _ in range(calls):
                    sample_outputs(net, x, SAMPLES, SEED)
            events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            share = {e.key: e.self_cpu_time_total / total for e in events}
            for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
                rows.append([network.name, event.key, event.self_cpu_time_total / calls,
                             f"{100 * share[event.key]:.0f}%"])
            masks = sum(share.get(op, 0.0) for op in _MASK_OPS)
            matmuls = share.get("aten::addmm", 0.0)
            summary.append(f"{network.name}: matmuls (aten::addmm) {100 * matmuls:.0f}%, "
                           f"drawing masks ({', '.join(op for op in _MASK_OPS if op in share)}) {100 * masks:.0f}% "
                           f"of {total / calls / 1e3:.2f} ms self CPU time per call")
    return rows, summary


_MASK_OPS = ("aten::random_", "aten::le", "aten::ne", "aten::bitwise_and")


def allocation_probe(quick: bool) -> dict[str, dict[str, float]]:
    """The engine at batch 64, 1 thread: ms per call, minor page faults per call, and the share of
    this process's matmul GFLOP/s ([T·64, width] @ [width, width]) that the call reaches."""
    import resource

    results: dict[str, dict[str, float]] = {}
    torch.set_num_threads(1)
    for network in NETWORKS:
        net = build_network(network.spec, seed=0)
        x = torch.randn(64, network.spec.n_inputs, generator=torch.Generator().manual_seed(4))
        peak = matmul_gflops(SAMPLES * 64, network.width, torch.device("cpu"), quick=quick)
        seconds = seconds_per_call(lambda: sample_outputs(net, x, SAMPLES, SEED), quick=quick)
        calls = 20
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            sample_outputs(net, x, SAMPLES, SEED)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
        fraction = linear_flops(net, 64, SAMPLES) / seconds / 1e9 / peak
        results[network.name] = {"ms": seconds * 1e3, "faults": faults, "of_matmul": fraction}
    return results


def _probe_in_subprocess(quick: bool, tuned: bool) -> dict[str, dict[str, float]]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    command = ([sys.executable, "-m", "bench.mc_engine", "--allocation-probe"] + (["--quick"] if quick else [])
               + (["--tuned"] if tuned else []))
    done = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def allocation_section(quick: bool) -> Section:
    plain = _probe_in_subprocess(quick, tuned=False)
    tuned = _probe_in_subprocess(quick, tuned=True)
    rows = []
    for key in plain:
        rows.append([key, plain[key]["ms"], plain[key]["faults"], f"{100 * plain[key]['of_matmul']:.0f}%",
                     tuned[key]["ms"], tuned[key]["faults"], f"{100 * tuned[key]['of_matmul']:.0f}%",
                     plain[key]["ms"] / tuned[key]["ms"]])
    return Section(
        key="mc-engine-allocation",
        title=f"2d. Page faults: batch 64, T = {SAMPLES}, 1 thread, glibc malloc as is vs service.tuning",
        baseline="a fresh process with glibc's default (dynamic) malloc thresholds, same code",
        columns=["network", "default ms/call", "default page faults/call", "default / matmul",
                 "tuned ms/call", "tuned page faults/call", "tuned / matmul", "speed-up from tuning"],
        rows=rows,
        notes=["Tuned: service.tuning.tune_allocator() at start-up, i.e. mallopt(M_MMAP_THRESHOLD, 64 MiB) and "
               "mallopt(M_TRIM_THRESHOLD, 256 MiB), as the API and the workers call it. Every call "
               "allocates fresh activation and mask tensors of ~1.6 MB; with the default thresholds glibc maps "
               "them from the kernel and gives them back, so each page faults in again on the next call. "
               "Two fresh processes, one after the other, each measured the same way; \"/ matmul\" is the "
               "share of that process's own matmul GFLOP/s (as in 2), the 50% target of item 2."],
    )


def run(quick: bool = False, device: str | torch.device = "cpu",
        threads: list[tuple[str, int]] | None = None) -> list[Section]:
    """The sections; ``threads`` as (label, count) pairs, default 1 and torch's default.

    Tunes glibc malloc for this process first (service.tuning.tune_allocator), as the API and the
    workers do at start-up.
    """
    tune_allocator()
    device = torch.device(device)
    load_before = load_average()
    results = measure(quick, device, threads)
    load_after = load_average()
    where = "" if device.type == "cpu" else f" on {device.type.upper()}"
    noise = (f"Load average (1/5/15 min) {load_before} before, {load_after} after: the machine is shared, "
             "so compare ratios, not absolute times.")

    speed_rows, speed_ok = [], []
    for m in results:
        ok = m.speedup >= SPEEDUP_TARGET
        if m.batch == 1:
            speed_ok.append(ok)
        speed_rows.append([m.network.name, m.threads, m.batch, m.engine_s * 1e3, m.loop_s * 1e3, m.speedup,
                           ("yes" if ok else "no") if m.batch == 1 else "—"])
    speed = Section(
        key="mc-engine",
        title=f"1. MC engine vs a plain loop of T forwards (T = {SAMPLES}){where}",
        baseline="service.ml.mc.sample_outputs_loop: T separate forward passes with the dropout modules on, "
                 "same net, inputs, seed and threads",
        columns=["network", "threads", "batch", "engine ms/call", "loop ms/call", "speed-up", ">= 15x"],
        rows=speed_rows,
        target=f">= {SPEEDUP_TARGET:.0f}x at batch 1 (every thread setting)",
        met=all(speed_ok),
        notes=[noise],
    )
    slow_default = [m for m in results if m.threads != "1" and m.batch == 1 and m.speedup < SPEEDUP_TARGET]
    if slow_default and device.type == "cpu":
        speed.notes.append(
            "With more than one thread, each matmul of the batched engine is an OpenMP parallel region; when "
            "another process holds one of the cores, every region waits for a time slice (oversubscription), "
            "so the engine can fall far behind the loop, whose tiny [B, 64] matmuls stay single-threaded. "
            "The API serves with 1 thread (MCDROP_API_TORCH_THREADS=1), which avoids this.")

    flop_rows, flop_ok = [], []
    for m in results:
        fraction = m.gflops(m.engine_s) / m.matmul_gflops
        if m.batch == 64:
            flop_ok.append(fraction >= PEAK_FRACTION_TARGET)
        flop_rows.append([m.network.name, m.threads, m.batch, m.flops / 1e6, m.engine_s * 1e3, m.gflops(m.engine_s),
                          f"[{SAMPLES * m.batch}, {m.network.width}] @ [{m.network.width}, {m.network.width}]",
                          m.matmul_gflops, f"{100 * fraction:.0f}%"])
    flops = Section(
        key="mc-engine-flops",
        title=f"2. MC engine GFLOP/s vs this machine's matmul GFLOP/s (float32, T = {SAMPLES}){where}",
        baseline="torch.matmul of [T·B, width] @ [width, width] (width = the widest hidden layer), float32, "
                 "same threads, measured in the same run",
        columns=["network", "threads", "batch", "engine MFLOP/call", "engine ms/call", "engine GFLOP/s",
                 "matmul shape", "matmul GFLOP/s", "engine / matmul"],
        rows=flop_rows,
        target=f">= {100 * PEAK_FRACTION_TARGET:.0f}% of matmul GFLOP/s at batch 64",
        met=all(flop_ok),
        notes=["FLOPs are the Linear layers' 2·m·n·k over the T passes; the layers before the first dropout "
               "are counted once (they are computed once). Masks, ReLU and copies count as no FLOPs: they are "
               "the overhead this ratio exposes. The UCI net does 22 Linear FLOPs per mask element (textbook: "
               "75), so drawing its masks bounds it well below the matmul rate whatever the engine does.",
               noise],
    )

    sections = [speed, flops]
    if device.type == "cpu":
        profile_rows, profile_summary = profile(device)
        sections.append(Section(
            key="mc-engine-profile",
            title=f"2c. Where the time goes: batch 64, T = {SAMPLES}, 1 thread (torch.profiler, self CPU time)",
            baseline="the engine's total self CPU time per call (shares add up to 100% per network)",
            columns=["network", "aten op", "µs/call", "share"],
            rows=profile_rows,
            notes=profile_summary + [
                "Masks: aten::random_ draws the int64 words (16-bit lanes, or single bits for p = 0.5), "
                "aten::le / aten::bitwise_and + aten::ne turn them into 0/1 floats; the narrow last layer's "
                "transposing copy is an aten::copy_. With glibc's default malloc thresholds these ops also "
                "pay for page faults on freshly mapped memory: see 2d."],
        ))
        sections.append(allocation_section(quick))
    return sections


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--allocation-probe", action="store_true", help="internal: print 2d's JSON for this process")
    parser.add_argument("--tuned", action="store_true", help="internal: with --allocation-probe, tune malloc first")
    args = parser.parse_args()
    if args.allocation_probe:
        import json

        if args.tuned:
            tune_allocator()
        print(json.dumps(allocation_probe(args.quick)))
        raise SystemExit(0)
    for section in run(quick=args.quick):
        print(section.markdown())
