"""Dropout's lesson, measured through the service: one classification sweep of the dropout rate on digits.

The sweep goes through the HTTP API (like bench/uci.py): an embedded mcdrop (API + worker),
the builtin digits data set (1,797 images of 8 x 8 pixels, 10 classes) and ``POST /v1/sweeps``
with dropout rate p in 0, 0.1, 0.3, 0.5, 0.7 on the inputs and on the hidden units (input
dropout = p, the MC dropout paper's tie), times 5 random splits. Each split trains on 500
images, validates on 250 and tests on the other 1,047. The network is over-sized for 500
images (64 -> 256 ReLU -> 10) and trained long (Adam, learning rate 1e-3, batch 32, no weight
decay, 1,000 epochs = 16,000 steps) so that without dropout it memorises the training images.

The sweep engine trains the 25 nets at once as stacked networks and scores every net on the
rows it trained on, on its validation rows and (``test_every_configuration``) on its split's
test rows, with MC dropout (T = 100) and with the deterministic (weight-scaled) net. The table
shows mean ± SE over the 5 splits.
"""

from __future__ import annotations

import time

import httpx
import numpy as np

from bench.report import Section
from bench.server import embedded_server, wait_until_done

RATES = [0.0, 0.1, 0.3, 0.5, 0.7]
N_DIGITS = 1797
TRAIN_IMAGES, VALIDATION_IMAGES = 500, 250


def sweep_body(dataset_id: str, *, rates: list[float], n_splits: int, epochs: int, hidden: list[int],
               samples: int, tie_input_dropout: bool = True) -> dict:
    splits = []
    for split in range(n_splits):
        order = np.random.default_rng(split).permutation(N_DIGITS).tolist()
        # The last VALIDATION_IMAGES of train_indices validate (validation_fraction below).
        splits.append({"train_indices": order[: TRAIN_IMAGES + VALIDATION_IMAGES],
                       "test_indices": order[TRAIN_IMAGES + VALIDATION_IMAGES:]})
    return {
        "dataset_id": dataset_id,
        "model": {"hidden_layers": hidden, "dropout": 0.0},
        "training": {"epochs": epochs, "batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.0, "seed": 0,
                     "validation_fraction": VALIDATION_IMAGES / (TRAIN_IMAGES + VALIDATION_IMAGES)},
        "grid": {"dropout": rates},
        "tie_input_dropout": tie_input_dropout,
        "splits": {"given": splits},
        "metric": "nll",
        "retrain_best": False,
        "test_every_configuration": True,
        "search_samples": samples,
    }


def _mean_se(summary: dict | None, digits: int = 3) -> str:
    if not summary or summary.get("mean") is None:
        return "n/a"
    if summary.get("se") is None:
        return f"{summary['mean']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {summary['se']:.{digits}f}"


def run(quick: bool = False) -> list[Section]:
    epochs = 20 if quick else 1000
    n_splits = 2 if quick else 5
    rates = [0.0, 0.5] if quick else RATES
    hidden = [256]
    samples = 100
    started = time.monotonic()
    # Embedded on loopback without API keys: every caller is tenant "default".
    with embedded_server(env={"MCDROP_AUTH": "off"}) as base, httpx.Client(base_url=base, timeout=120) as client:
        dataset = client.post("/v1/datasets", json={"name": "digits", "builtin": "digits"})
        dataset.raise_for_status()
        body = sweep_body(dataset.json()["id"], rates=rates, n_splits=n_splits, epochs=epochs, hidden=hidden,
                          samples=samples)
        response = client.post("/v1/sweeps", json=body)
        response.raise_for_status()
        sweep = wait_until_done(client, f"/v1/sweeps/{response.json()['id']}", timeout_s=3600, poll_s=1)
    wall = time.monotonic() - started
    title = (f"Dropout's lesson on digits: {TRAIN_IMAGES} training images, Dense {hidden[0]:,}, {epochs:,} epochs, "
             f"{n_splits} splits (one sweep through the HTTP API)")
    baseline = "the same network without dropout (p = 0); MC dropout (T = 100) beside the deterministic net"
    columns = ["dropout p", "train acc. (det.)", "val. acc. (det.)", "train NLL (det.)", "val. NLL (det.)",
               "gap: val. − train NLL (det.)", "test acc. det. / MC", "test NLL (det.)", "test NLL (MC)",
               "test ECE (det.)", "test ECE (MC)"]
    if sweep["status"] != "succeeded":
        return [Section(key="dropout-lesson", title=title, baseline=baseline, columns=columns,
                        rows=[["sweep " + sweep["status"], str(sweep.get("error"))] + [""] * (len(columns) - 2)])]
    ranking = sorted(sweep["results"]["ranking"], key=lambda entry: entry["configuration"]["dropout"])
    rows = []
    for entry in ranking:
        train, validation, test, gap = entry["train"], entry["validation"], entry["test"], entry["gap"]
        rows.append([
            f"{entry['configuration']['dropout']:.1f}",
            _mean_se(train["deterministic_accuracy"]), _mean_se(validation["deterministic_accuracy"]),
            _mean_se(train["deterministic_nll"], 4), _mean_se(validation["deterministic_nll"]),
            _mean_se(gap["deterministic_nll"]),
            f"{test['deterministic_accuracy']['mean']:.3f} / {test['accuracy']['mean']:.3f}",
            _mean_se(test["deterministic_nll"]), _mean_se(test["nll"]),
            _mean_se(test["deterministic_ece"]), _mean_se(test["ece"]),
        ])
    best = sweep["results"]["best"]
    return [Section(
        key="dropout-lesson",
        title=title,
        baseline=baseline,
        columns=columns,
        rows=rows,
        notes=[
            "Mean ± SE over the splits. Input dropout = p (the MC dropout paper's tie). det. = dropout off with "
            "inverted-dropout scaling (the usual test-time network); MC = mean of T = 100 stochastic passes with "
            "dropout on. train = the 500 images a net trained on, val. = its split's 250 validation images, test = "
            "the split's other 1,047 images (scored for every p; the ranking uses validation only).",
            f"The sweep's ranking by validation NLL (MC) picks p = {best['dropout']}. "
            f"Wall time {wall:.0f} s on this machine (API + one worker in embedded mode, {len(rates) * n_splits} "
            "stacked nets).",
        ],
    )]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for section in run(quick=parser.parse_args().quick):
        print(section.markdown())
