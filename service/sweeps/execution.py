"""Running a sweep: stacked training of every (configuration, split) net, validation ranking,
then (optionally) each split's best configuration retrained and tested — the UCI protocol of
Gal & Ghahramani 2016, end to end. Pure orchestration of service.ml.sweep; no database.

Every net is standardised with the statistics of the rows it trains on (as a single run is).
The engine shares one input matrix between nets, so the data set is stacked once per split,
standardised with that split's training-row statistics, and each net indexes its own block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.ml.data import Dataset, Standardizer
from service.ml.sweep import (
    NetConfig,
    StackedMLP,
    StackedTrainingState,
    gaussian_log_likelihood_mc,
    heteroscedastic_log_likelihood_mc,
    predict_stacked,
    train_stacked,
)
from service.sweeps import planning
from service.sweeps.schemas import SweepCreate

Progress = Callable[[dict[str, Any]], None]


@dataclass
class NetPlan:
    split: int
    configuration: planning.Configuration
    fit_rows: np.ndarray  # rows the net trains on
    eval_rows: np.ndarray  # validation rows (search) or test rows (final)


@dataclass
class Checkpoint:
    """Where a sweep is: finished groups' metrics, and the running group's engine state."""

    phase: str  # "search" or "final"
    group: int
    state: StackedTrainingState | None
    finished: dict[str, list[dict[str, float | None]]]  # "<phase>:<group>" -> per-net metrics
    ranking: dict[str, Any] | None = None  # the search phase's result

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "group": self.group, "state": self.state.to_dict() if self.state else None,
                "finished": self.finished, "ranking": self.ranking}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        state = data.get("state")
        return cls(phase=data["phase"], group=int(data["group"]),
                   state=StackedTrainingState.from_dict(state) if state else None,
                   finished=data.get("finished") or {}, ranking=data.get("ranking"))


def _standardised_blocks(dataset: Dataset, row_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """The data set once per row set, standardised with that row set's statistics."""
    xs, ys, target_stats = [], [], []
    for rows in row_sets:
        x_scaler = Standardizer.fit(dataset.features[rows])
        y_scaler = Standardizer.fit(dataset.target[rows].reshape(-1, 1).astype(np.float32))
        xs.append(x_scaler.transform(dataset.features).astype(np.float32))
        ys.append(y_scaler.transform(dataset.target.reshape(-1, 1).astype(np.float32)).reshape(-1))
        target_stats.append((float(y_scaler.mean.reshape(-1)[0]), float(y_scaler.std.reshape(-1)[0])))
    return np.concatenate(xs), np.concatenate(ys), target_stats


def _net_config(plan: NetPlan, spec: SweepCreate, seed: int) -> NetConfig:
    c = plan.configuration
    return NetConfig(
        dropout=c.dropout, input_dropout=c.input_dropout, weight_decay=c.penalty(len(plan.fit_rows)),
        l1=spec.training.l1, learning_rate=c.learning_rate, seed=seed, heteroscedastic=spec.model.heteroscedastic,
    )


def _groups(plans: list[NetPlan]) -> list[list[int]]:
    """Nets of one architecture train in one stack."""
    by_arch: dict[tuple[int, ...], list[int]] = {}
    for i, plan in enumerate(plans):
        by_arch.setdefault(plan.configuration.hidden_layers, []).append(i)
    return list(by_arch.values())


def _evaluate(model: StackedMLP, dataset: Dataset, plans: list[NetPlan], blocks: np.ndarray,
              stats: list[tuple[float, float]], block_of: list[int], spec: SweepCreate, samples: int, seed: int) -> list[dict]:
    n_rows = dataset.n_rows
    widest = max(len(p.eval_rows) for p in plans)
    x = np.zeros((len(plans), widest, dataset.n_features), dtype=np.float32)
    y = np.zeros((len(plans), widest), dtype=np.float64)
    for i, plan in enumerate(plans):
        offset = block_of[i] * n_rows
        x[i, : len(plan.eval_rows)] = blocks[offset + plan.eval_rows]
        y[i, : len(plan.eval_rows)] = dataset.target[plan.eval_rows]
    outputs = predict_stacked(model, torch.as_tensor(x), samples, seed).to(torch.float64)  # [M, T, B, out]
    shift = torch.tensor([stats[b][0] for b in block_of], dtype=torch.float64)[:, None, None]
    scale = torch.tensor([stats[b][1] for b in block_of], dtype=torch.float64)[:, None, None]
    means = outputs[..., 0] * scale + shift
    if spec.model.heteroscedastic:
        variances = outputs[..., 1].exp() * scale**2
        log_likelihood = heteroscedastic_log_likelihood_mc(torch.as_tensor(y), means, variances)
    else:
        taus = [p.configuration.tau for p in plans]
        log_likelihood = (gaussian_log_likelihood_mc(torch.as_tensor(y), means, torch.tensor(taus, dtype=torch.float64))
                          if all(t is not None for t in taus) else None)
    results = []
    for i, plan in enumerate(plans):
        b = len(plan.eval_rows)
        error = means[i, :, :b].mean(dim=0) - torch.as_tensor(y[i, :b])
        rmse = float(error.square().mean().sqrt())
        ll = float(log_likelihood[i, :b].mean()) if log_likelihood is not None else None
        results.append({"rmse": rmse if math.isfinite(rmse) else None,
                        "log_likelihood": ll if ll is not None and math.isfinite(ll) else None})
    return results


def _run_phase(phase: str, plans: list[NetPlan], dataset: Dataset, spec: SweepCreate, checkpoint: Checkpoint,
               save: Callable[[Checkpoint, int], None], should_stop: Callable[[], bool], samples: int,
               epoch_offset: int) -> list[dict]:
    seed = spec.training.seed or 0
    row_sets: dict[int, np.ndarray] = {}
    for plan in plans:
        row_sets.setdefault(plan.split, plan.fit_rows)
    splits_order = sorted(row_sets)
    blocks_x, blocks_y, stats = _standardised_blocks(dataset, [row_sets[s] for s in splits_order])
    block_index = {s: k for k, s in enumerate(splits_order)}
    groups = _groups(plans)
    metrics: list[dict | None] = [None] * len(plans)
    epochs = spec.training.epochs
    for g, members in enumerate(groups):
        key = f"{phase}:{g}"
        if key in checkpoint.finished:
            for i, value in zip(members, checkpoint.finished[key]):
                metrics[i] = value
            continue
        group_plans = [plans[i] for i in members]
        configs = [_net_config(p, spec, seed + 7919 * k) for k, p in enumerate(group_plans)]
        model = StackedMLP.from_configs(dataset.n_features, group_plans[0].configuration.hidden_layers, configs,
                                        activation=spec.model.activation)
        block_of = [block_index[p.split] for p in group_plans]
        train_index = [p.fit_rows + block_of[k] * dataset.n_rows for k, p in enumerate(group_plans)]
        resume = checkpoint.state if checkpoint.phase == phase and checkpoint.group == g else None
        every = max(1, epochs // 20)

        def on_epoch(state: StackedTrainingState, g: int = g) -> None:
            done = epoch_offset + (g * epochs + state.epochs_done) // len(groups)
            if state.epochs_done % every == 0 or state.epochs_done == epochs:
                save(Checkpoint(phase, g, state, checkpoint.finished, checkpoint.ranking), done)

        state = train_stacked(model, blocks_x, blocks_y, train_index, configs, epochs=epochs,
                              batch_size=spec.training.batch_size, on_epoch=on_epoch, should_stop=should_stop, state=resume)
        del state
        group_metrics = _evaluate(model, dataset, group_plans, blocks_x, stats, block_of, spec, samples, seed + g)
        for i, value in zip(members, group_metrics):
            metrics[i] = value
        checkpoint.finished[key] = group_metrics
        checkpoint.phase, checkpoint.group, checkpoint.state = phase, g + 1, None
        save(checkpoint, epoch_offset + ((g + 1) * epochs) // len(groups))
    return [m or {"rmse": None, "log_likelihood": None} for m in metrics]


def run_sweep(dataset: Dataset, spec: SweepCreate, *, checkpoint: Checkpoint | None,
              save: Callable[[Checkpoint, int], None], should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Both phases; ``save(checkpoint, epochs_done)`` is called at epoch boundaries and after
    every finished stack, and a sweep resumed from a checkpoint continues where it stopped."""
    configurations = planning.configurations(spec)
    splits = planning.splits(spec, dataset.n_rows)
    fraction = spec.training.validation_fraction
    checkpoint = checkpoint or Checkpoint("search", 0, None, {})
    search_plans = []
    for s, (train, _test) in enumerate(splits):
        fit, validation = planning.search_rows(train, fraction)
        search_plans += [NetPlan(s, c, fit, validation) for c in configurations]
    if checkpoint.ranking is None:
        search = _run_phase("search", search_plans, dataset, spec, checkpoint, save, should_stop, spec.search_samples, 0)
        checkpoint.ranking = _rank(configurations, len(splits), search, spec.metric)
        checkpoint.phase, checkpoint.group, checkpoint.state = "final", 0, None
        save(checkpoint, spec.training.epochs)
    results: dict[str, Any] = {"metric": spec.metric, **checkpoint.ranking}
    if spec.retrain_best:
        best = checkpoint.ranking["best_per_split"]
        final_plans = [NetPlan(s, configurations[best[s]], train, test) for s, (train, test) in enumerate(splits)]
        final = _run_phase("final", final_plans, dataset, spec, checkpoint, save, should_stop, spec.test_samples, spec.training.epochs)
        results["test"] = {
            "rmse": planning.mean_and_standard_error([m["rmse"] for m in final]),
            "log_likelihood": planning.mean_and_standard_error([m["log_likelihood"] for m in final]),
            "samples": spec.test_samples,
            "per_split": [{"split": s, "configuration": best[s], **m} for s, m in enumerate(final)],
        }
    return results


def _rank(configurations: list[planning.Configuration], n_splits: int, search: list[dict], metric: str) -> dict[str, Any]:
    n_configs = len(configurations)
    per_config = [[search[s * n_configs + c] for s in range(n_splits)] for c in range(n_configs)]
    entries = []
    for c, values in enumerate(per_config):
        entries.append({
            "configuration": configurations[c].label(),
            "validation": {name: planning.mean_and_standard_error([v[name] for v in values]) for name in ("log_likelihood", "rmse")},
            "per_split": values,
        })
    sign = -1.0 if planning.HIGHER_IS_BETTER[metric] else 1.0
    order = sorted(range(n_configs), key=lambda c: (entries[c]["validation"][metric]["mean"] is None,
                                                    sign * (entries[c]["validation"][metric]["mean"] or 0.0)))
    best_per_split = [planning.best_index([per_config[c][s][metric] for c in range(n_configs)], metric) for s in range(n_splits)]
    return {"ranking": [entries[c] for c in order], "best": configurations[order[0]].label(), "best_per_split": best_per_split}
