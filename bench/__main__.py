"""``python -m bench`` (``make bench``): run the benchmark modules in order, write BENCHMARKS.md.

Each module exposes ``run(quick: bool = False) -> list[Section]`` (bench/report.py). A module that
cannot be imported, or raises, becomes a note in the report; the others still run. A module
without ``run`` is run as ``python -m bench.<module>`` and its output is included as a note.

    python -m bench                     everything but the UCI protocol (long), GPU part if CUDA
    python -m bench --quick             smoke mode: fewer repetitions and epochs (< 1 min for ours)
    python -m bench --only mc-engine,training
    python -m bench --uci               also the UCI protocol (or: --only uci)
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import machine

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Module:
    key: str  # what --only takes
    name: str  # bench.<name>
    what: str


MODULES = (
    Module("mc-engine", "mc_engine", "1-2. MC engine: vs a loop of T forwards; GFLOP/s vs matmul"),
    Module("http-serving", "http_serving", "API throughput, micro-batching, BentoML peer, submit latency"),
    Module("training", "training_throughput", "6. training through the service vs a plain PyTorch loop"),
    Module("sweep-engine", "sweep_engine", "sweep engine: stacked vs sequential training"),
    Module("uci", "uci", "UCI protocol (long: only with --uci or --only uci)"),
    Module("dropout-lesson", "dropout_lesson", "the dropout lesson"),
    Module("gpu", "gpu", "items 1, 2, 6 and the sweep engine on CUDA (only when CUDA is present)"),
)

HOW_TO_READ = (
    "Every number that matters here is a ratio against a baseline measured in the same run, on the same "
    "machine, with the same threads and data (the baseline is named above each table), so read the "
    "speed-up and percentage columns. This machine is shared with other engineers and their tests: "
    "absolute times move from run to run (sometimes by several times, above all with more than one torch "
    "thread, when a neighbour holds a core), and the load average at the start and end of the run is "
    "recorded for that reason. Times in ms or s are only for orientation; absolute times count only on a "
    "GPU. A target marked NOT met in a quick run (`--quick`) is a hint, not a verdict: quick runs use "
    "fewer repetitions and epochs."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: fewer repetitions and epochs")
    parser.add_argument("--only", default=None,
                        help="comma-separated modules: " + ", ".join(m.key for m in MODULES))
    parser.add_argument("--uci", action="store_true", help="also run the UCI protocol (long)")
    parser.add_argument("--output", default="BENCHMARKS.md", help="report path (default BENCHMARKS.md)")
    args = parser.parse_args(argv)
    if args.only is not None:
        known = {m.key: m.key for m in MODULES} | {m.name: m.key for m in MODULES}
        wanted = [part.strip() for part in args.only.split(",") if part.strip()]
        unknown = [part for part in wanted if part not in known]
        if unknown or not wanted:
            parser.error(f"--only: unknown {', '.join(unknown) or '(nothing)'}; choose from "
                         + ", ".join(m.key for m in MODULES))
        args.only = {known[part] for part in wanted}
    return args


def selected(args: argparse.Namespace) -> list[Module]:
    if args.only is not None:
        return [m for m in MODULES if m.key in args.only]
    return [m for m in MODULES if (m.key != "uci" or args.uci) and (m.key != "gpu" or torch.cuda.is_available())]


def _failure(what: str, exc: BaseException) -> str:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{what}: `{type(exc).__name__}: {exc}`\n\n```\n{''.join(lines[-6:]).rstrip()}\n```"


def _as_subprocess(module: Module, quick: bool) -> str:
    """Run ``python -m bench.<name>`` (a module without ``run``) and return its output as a note."""
    source = (REPO / "bench" / f"{module.name}.py").read_text(errors="replace")
    command = [sys.executable, "-m", f"bench.{module.name}"] + (["--quick"] if quick and "--quick" in source else [])
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600 if quick else 3600)
    except subprocess.TimeoutExpired as exc:
        return f"`{shlex.join(command[1:])}` timed out after {exc.timeout:.0f} s."
    output = (done.stdout + ("\n" + done.stderr if done.returncode else "")).strip()
    return (f"bench.{module.name} has no `run()` yet; output of `python {shlex.join(command[1:])}` "
            f"(exit {done.returncode}):\n\n```\n{output[-20000:]}\n```")


def run_module(module: Module, quick: bool) -> tuple[list[str], float]:
    """Markdown blocks for one module (sections, or a note saying why there are none) and its seconds."""
    started = time.perf_counter()
    threads = torch.get_num_threads()
    blocks: list[str] = []
    try:
        if module.key == "gpu" and not torch.cuda.is_available():
            from bench.gpu import NO_CUDA

            return [NO_CUDA + "."], 0.0
        try:
            imported = importlib.import_module(f"bench.{module.name}")
        except Exception as exc:
            return [_failure(f"Skipped: bench.{module.name} could not be imported", exc)], 0.0
        if not callable(getattr(imported, "run", None)):
            return [_as_subprocess(module, quick)], time.perf_counter() - started
        sections = imported.run(quick=quick)
        if not isinstance(sections, list) or not all(callable(getattr(s, "markdown", None)) for s in sections):
            return [f"Skipped: bench.{module.name}.run() returned {type(sections).__name__}, not a list of "
                    "Section."], time.perf_counter() - started
        blocks = [section.markdown() for section in sections] or [f"bench.{module.name}.run() returned no sections."]
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # includes SystemExit from a module: note it, go on
        blocks.append(_failure(f"bench.{module.name} raised", exc))
    finally:
        torch.set_num_threads(threads)  # a module must not change the next one's threads
    return blocks, time.perf_counter() - started


def summary_rows(markdown: str) -> list[str]:
    """Target lines of the report, for the summary at the top."""
    rows, title = [], None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif line.startswith("Target: ") and title:
            rows.append(f"| {title} | {line[len('Target: '):]} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = selected(args)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    started_at = datetime.now(timezone.utc)
    facts = machine.describe()
    started = time.perf_counter()
    body: list[str] = []
    for module in modules:
        print(f"bench: {module.key} ({module.what}) ...", flush=True)
        blocks, seconds = run_module(module, args.quick)
        print(f"bench: {module.key} done in {seconds:.1f} s", flush=True)
        body += [f"## {module.key}: {module.what}", "", f"_{seconds:.1f} s_", "", *blocks, ""]
    total = time.perf_counter() - started
    results = "\n".join(body)
    header = [
        "# mcdrop benchmarks",
        "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC, {total:.0f} s",
        f"- command: `{command}`" + (" (QUICK smoke run: not final numbers)" if args.quick else ""),
        *[f"- {fact}" for fact in facts],
        f"- load average at end: {machine.load_average()}",
        "",
        "## How to read this",
        "",
        HOW_TO_READ,
        "",
    ]
    targets = summary_rows(results)
    if targets:
        header += ["## Targets", "", "| benchmark | target |", "|---|---|", *targets, ""]
    output = Path(args.output)
    if not output.is_absolute():
        output = Path.cwd() / output
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text("\n".join(header) + "\n" + results)
    temporary.replace(output)
    print(f"bench: wrote {output} in {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
