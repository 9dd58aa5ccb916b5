"""Dropout's lesson, measured through the service: a sweep of the dropout rate 0 … 0.7 on digits.

Each run trains the same over-sized network (Dense 256 ReLU → dropout p → Dense 256 ReLU →
dropout p) on 400 training images for 150 epochs, then the service's evaluation scores the 1,397
held-out images with MC dropout (T = 100) and with the deterministic (weight-scaled) net. The
train NLL is the deterministic net's on the training images (via the predict endpoint), so the
train/test gap shows overfitting without dropout and how dropout narrows it.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
from sklearn.datasets import load_digits

from bench.report import Section
from bench.server import embedded_server, wait_until_done

RATES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def run(quick: bool = False) -> list[Section]:
    epochs = 10 if quick else 150
    rates = [0.0, 0.5] if quick else RATES
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    train, test = order[:400].tolist(), order[400:].tolist()
    rows = []
    with embedded_server() as base, httpx.Client(base_url=base, timeout=120) as client:
        dataset = client.post("/v1/datasets", json={"name": "digits", "builtin": "digits"}).json()
        for rate in rates:
            body = {
                "dataset_id": dataset["id"],
                "model": {"hidden_layers": [256, 256], "dropout": rate},
                "training": {"epochs": epochs, "batch_size": 32, "learning_rate": 0.001, "seed": 0, "validation_fraction": 0},
                "split": {"train_indices": train, "test_indices": test},
                "evaluation": {"samples": 100},
            }
            run = client.post("/v1/runs", json=body).json()
            finished = wait_until_done(client, f"/v1/runs/{run['id']}", timeout_s=1800, poll_s=0.5)
            if finished["status"] != "succeeded":
                rows.append([rate, "failed: " + str(finished["error"])] + [""] * 8)
                continue
            report = client.get(f"/v1/runs/{run['id']}/evaluation").json()
            predicted = client.post(f"/v1/runs/{run['id']}/predict", json={
                "inputs": digits.data[train].tolist(), "samples": 1, "seed": 0}).json()["predictions"]
            train_nll = -float(np.mean([math.log(max(p["deterministic"]["probabilities"][y], 1e-12))
                                        for p, y in zip(predicted, digits.target[train])]))
            det, mc = report["deterministic"], report["mc"]
            rows.append([rate, train_nll, det["nll"], det["nll"] - train_nll, det["accuracy"], mc["accuracy"],
                         mc["nll"], det["ece"], mc["ece"], mc.get("auroc_mutual_information")])
    return [Section(
        key="dropout-lesson",
        title=f"Dropout's lesson on digits: 400 training images, Dense 256-256, {epochs} epochs",
        baseline="the same network without dropout (p = 0); MC dropout (T = 100) beside the deterministic net",
        columns=["dropout p", "train NLL (det.)", "test NLL (det.)", "gap", "test acc. (det.)", "test acc. (MC)",
                 "test NLL (MC)", "ECE (det.)", "ECE (MC)", "AUROC misclassified by MI"],
        rows=rows,
        notes=["Lower gap = less overfitting. MC = mean of T stochastic passes with dropout on; det. = dropout "
               "off with inverted-dropout scaling (the usual test-time network)."],
    )]


if __name__ == "__main__":
    for section in run():
        print(section.markdown())
