"""The MC dropout paper's UCI regression table, reproduced through the service's HTTP API.

For each data set in ../shared/uci: upload it as CSV, submit the paper's protocol as one sweep
(the 20 published splits, the grids of dropout rate × tau, input dropout = p, Dense(50, ReLU),
L2 from a prior length-scale of 0.01, Adam, batch 128, validation on the last 20 % of each
split's training rows, retrain the best pair per split on all its training rows, T = 10,000
test passes), wait, and compare RMSE and test log-likelihood (mean ± SE over splits) with the
published numbers. A second sweep per data set uses the heteroscedastic head ("beyond the
paper"). Run: ``make bench-uci`` (``python -m bench.uci --epochs 4000``).
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import httpx

from bench.report import Section
from bench.server import embedded_server, wait_until_done

UCI = Path(__file__).resolve().parents[2] / "shared" / "uci"
DATASETS = ["bostonHousing", "concrete", "energy", "wine-quality-red", "power-plant"]
PAPER = {  # RMSE, test log-likelihood (mean ± SE), Gal & Ghahramani 2016, MC dropout
    "bostonHousing": ((2.90, 0.18), (-2.40, 0.04)),
    "concrete": ((4.82, 0.16), (-2.93, 0.02)),
    "energy": ((0.54, 0.01), (-1.21, 0.01)),
    "wine-quality-red": ((0.62, 0.01), (-0.93, 0.01)),
    "power-plant": ((4.01, 0.04), (-2.80, 0.01)),
}


def _numbers(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()]


def load(name: str) -> tuple[bytes, list[dict], list[float], list[float]]:
    folder = UCI / name
    rows = [line.split() for line in (folder / "data.txt").read_text().splitlines() if line.strip()]
    features = [int(i) for i in _numbers(folder / "index_features.txt")]
    target = int(_numbers(folder / "index_target.txt")[0])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f"x{i}" for i in features] + ["y"])
    for row in rows:
        writer.writerow([row[i] for i in features] + [row[target]])
    n_splits = int((folder / "n_splits.txt").read_text().split()[0])
    splits = [
        {"train_indices": [int(i) for i in _numbers(folder / f"index_train_{k}.txt")],
         "test_indices": [int(i) for i in _numbers(folder / f"index_test_{k}.txt")]}
        for k in range(n_splits)
    ]
    return buffer.getvalue().encode(), splits, _numbers(folder / "dropout_rates.txt"), _numbers(folder / "tau_values.txt")


def sweep_body(dataset_id: str, splits: list[dict], rates: list[float], taus: list[float], epochs: int,
               heteroscedastic: bool, test_samples: int) -> dict:
    return {
        "dataset_id": dataset_id,
        "model": {"hidden_layers": [50], "dropout": rates[0], "input_dropout": rates[0], "tau": taus[0],
                  "prior_lengthscale": 1e-2, "heteroscedastic": heteroscedastic},
        "training": {"epochs": epochs, "batch_size": 128, "optimizer": "adam", "learning_rate": 0.001,
                     "validation_fraction": 0.2, "seed": 0},
        "grid": {"dropout": rates, **({} if heteroscedastic else {"tau": taus})},
        "tie_input_dropout": True,
        "splits": {"given": splits},
        "metric": "log_likelihood",
        "retrain_best": True,
        "search_samples": 1000,
        "test_samples": test_samples,
    }


def _fmt(mean_se: dict | None) -> str:
    if not mean_se or mean_se.get("mean") is None:
        return "n/a"
    return f"{mean_se['mean']:.2f} ± {mean_se['se']:.2f}" if mean_se.get("se") is not None else f"{mean_se['mean']:.2f}"


def run(quick: bool = False, epochs: int | None = None, datasets: list[str] | None = None,
        heteroscedastic: bool = True, test_samples: int = 10_000, paper: bool = True) -> list[Section]:
    epochs = epochs or (40 if quick else 4000)
    names = datasets or (DATASETS[:1] if quick else DATASETS)
    rows: list[list[object]] = []
    within = []
    started_all = time.monotonic()
    with embedded_server() as base, httpx.Client(base_url=base, timeout=120) as client:
        for name in names:
            content, splits, rates, taus = load(name)
            dataset = client.post("/v1/datasets", data={"name": name, "target": "y", "task": "regression"},
                                  files={"file": (f"{name}.csv", content, "text/csv")})
            dataset.raise_for_status()
            variants = ([("MC dropout (paper's protocol)", False)] if paper else []) + (
                [("MC dropout, heteroscedastic head", True)] if heteroscedastic else [])
            for label, hetero in variants:
                started = time.monotonic()
                response = client.post("/v1/sweeps", json=sweep_body(dataset.json()["id"], splits, rates, taus, epochs, hetero, test_samples))
                response.raise_for_status()
                sweep = wait_until_done(client, f"/v1/sweeps/{response.json()['id']}", timeout_s=6 * 3600, poll_s=2)
                wall = time.monotonic() - started
                test = (sweep.get("results") or {}).get("test") or {}
                (paper_rmse, paper_ll) = PAPER[name]
                ll = (test.get("log_likelihood") or {}).get("mean")
                ok = ll is not None and abs(ll - paper_ll[0]) <= max(paper_ll[1], (test["log_likelihood"].get("se") or 0))
                if not hetero:
                    within.append(ok)
                rows.append([name, label, _fmt(test.get("rmse")), f"{paper_rmse[0]:.2f} ± {paper_rmse[1]:.2f}",
                             _fmt(test.get("log_likelihood")), f"{paper_ll[0]:.2f} ± {paper_ll[1]:.2f}",
                             ("yes" if ok else "no") if not hetero else "—", f"{wall:.0f}", sweep["status"]])
    total = time.monotonic() - started_all
    return [Section(
        key="uci",
        title=f"UCI regression, the MC dropout paper's protocol through the HTTP API ({epochs} epochs, T = {test_samples:,})",
        baseline="Gal & Ghahramani 2016, Table 1 (MC dropout, mean ± SE over 20 splits)",
        columns=["data set", "model", "RMSE", "paper RMSE", "test LL", "paper LL", "LL within 1 SE", "wall s", "status"],
        rows=rows,
        target="test LL within one SE of the paper's on every set; all five sets in under 10 minutes",
        met=all(within) and total < 600 if len(names) == len(DATASETS) else None,
        notes=[f"Total wall time {total:.0f} s on this machine (2 cores), API + one worker in embedded mode. "
               "Each sweep trains 20 splits × the grid as stacked networks, then retrains the best pair per split."],
    )]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4000)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--no-heteroscedastic", action="store_true")
    parser.add_argument("--only-heteroscedastic", action="store_true")
    parser.add_argument("--test-samples", type=int, default=10_000)
    args = parser.parse_args()
    for section in run(epochs=args.epochs, datasets=args.datasets.split(","),
                       heteroscedastic=not args.no_heteroscedastic, test_samples=args.test_samples,
                       paper=not args.only_heteroscedastic):
        print(section.markdown())


if __name__ == "__main__":
    main()
