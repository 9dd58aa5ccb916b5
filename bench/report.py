"""The contract between benchmark modules and the report.

Each benchmark module in bench/ exposes ``run(quick: bool = False) -> list[Section]``.
``make bench`` runs them in order and writes BENCHMARKS.md; a module can also be run alone
(``python -m bench.<module>``) and prints its sections as markdown.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Section:
    key: str  # e.g. "mc-engine"
    title: str  # e.g. "1. MC engine vs a plain loop of T forwards"
    baseline: str  # what the baseline is, in one sentence
    columns: list[str]
    rows: list[list[object]]
    target: str | None = None  # e.g. ">= 15x at batch 1"
    met: bool | None = None  # whether the target holds in this run
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", f"Baseline: {self.baseline}"]
        if self.target:
            verdict = "" if self.met is None else (" — met" if self.met else " — NOT met")
            lines.append(f"Target: {self.target}{verdict}")
        lines += ["", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(value) for value in row) + " |")
        for note in self.notes:
            lines += ["", note]
        return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 100_000:
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)
