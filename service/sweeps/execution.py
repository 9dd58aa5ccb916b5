"""Running a sweep: stacked training of every (configuration, split) net, validation ranking,
then (optionally) each split's best configuration retrained and tested — the UCI protocol of
Gal & Ghahramani 2016, end to end. Pure orchestration of service.ml.sweep; no database.

Every net is standardised with the statistics of the rows it trains on (as a single run is).
The engine shares one input matrix between nets, so the data set is stacked once per split,
standardised with that split's training-row statistics, and each net indexes its own block.

Regression nets are scored by RMSE and the MC test log-likelihood (with ``tau`` or the
heteroscedastic head). Classifiers (one logit per class, softmax cross-entropy) are scored with
:func:`service.ml.evaluation.evaluate_classification`, as a run's evaluation is: MC dropout's
accuracy, NLL, Brier score, ECE and the AUROCs of spotting its errors by predictive entropy and
mutual information, beside the deterministic (weight-scaled) net's accuracy, NLL, Brier score
and ECE; in the search phase on the validation rows *and* on the rows each net trained on, so
the train/validation gap is visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.ml.data import Dataset, Standardizer
from service.ml.evaluation import evaluate_classification
from service.ml.sweep import (
    NetConfig,
    StackedMLP,
    StackedTrainingState,
    deterministic_stacked,
    gaussian_log_likelihood_mc,
    heteroscedastic_log_likelihood_mc,
    predict_stacked,
    train_stacked,
)
from service.sweeps import planning
from service.sweeps.schemas import SweepCreate

Progress = Callable[[dict[str, Any]], None]

REGRESSION_METRICS = ("rmse", "log_likelihood")
# Per net and row set; MC dropout's unless prefixed "deterministic_".
CLASSIFICATION_METRICS = (
    "accuracy", "nll", "brier", "ece", "auroc_predictive_entropy", "auroc_mutual_information",
    "deterministic_accuracy", "deterministic_nll", "deterministic_brier", "deterministic_ece",
)
# Keys of a search net's metrics that hold the metrics of other row sets.
TRAIN, TEST = "train", "test"
# Largest MC output (T x rows x classes, summed over the nets scored at once), in elements.
_CLASSIFICATION_EVALUATION_ELEMENTS = 1 << 24


def metric_names(task: str) -> tuple[str, ...]:
    return CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS


@dataclass
class NetPlan:
    split: int
    configuration: planning.Configuration
    fit_rows: np.ndarray  # rows the net trains on
    eval_rows: np.ndarray  # validation rows (search) or test rows (final)
    test_rows: np.ndarray | None = None  # search, with test_every_configuration: the split's test rows


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
    """The data set once per row set, standardised with that row set's statistics (the target
    too for regression; a classifier's class indices are kept, with no target statistics)."""
    classification = dataset.task == "classification"
    xs, ys, target_stats = [], [], []
    for rows in row_sets:
        x_scaler = Standardizer.fit(dataset.features[rows])
        xs.append(x_scaler.transform(dataset.features).astype(np.float32))
        if classification:
            ys.append(dataset.target.astype(np.int64))
            continue
        y_scaler = Standardizer.fit(dataset.target[rows].reshape(-1, 1).astype(np.float32))
        ys.append(y_scaler.transform(dataset.target.reshape(-1, 1).astype(np.float32)).reshape(-1))
        target_stats.append((float(y_scaler.mean.reshape(-1)[0]), float(y_scaler.std.reshape(-1)[0])))
    return np.concatenate(xs), np.concatenate(ys), target_stats


def _net_config(plan: NetPlan, spec: SweepCreate, seed: int, task: str) -> NetConfig:
    c = plan.configuration
    return NetConfig(
        dropout=c.dropout, input_dropout=c.input_dropout, weight_decay=c.penalty(len(plan.fit_rows)),
        l1=spec.training.l1, learning_rate=c.learning_rate, seed=seed,
        heteroscedastic=spec.model.heteroscedastic and task == "regression",
    )


def _groups(plans: list[NetPlan]) -> list[list[int]]:
    """Nets of one architecture train in one stack."""
    by_arch: dict[tuple[int, ...], list[int]] = {}
    for i, plan in enumerate(plans):
        by_arch.setdefault(plan.configuration.hidden_layers, []).append(i)
    return list(by_arch.values())


def _evaluate(model: StackedMLP, dataset: Dataset, plans: list[NetPlan], rows: list[np.ndarray], blocks: np.ndarray,
              stats: list[tuple[float, float]], block_of: list[int], spec: SweepCreate, samples: int, seed: int) -> list[dict]:
    """Regression metrics of net i on ``rows[i]``: RMSE and MC test log-likelihood, original units."""
    n_rows = dataset.n_rows
    widest = max(len(r) for r in rows)
    x = np.zeros((len(plans), widest, dataset.n_features), dtype=np.float32)
    y = np.zeros((len(plans), widest), dtype=np.float64)
    for i, net_rows in enumerate(rows):
        offset = block_of[i] * n_rows
        x[i, : len(net_rows)] = blocks[offset + net_rows]
        y[i, : len(net_rows)] = dataset.target[net_rows]
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
    for i, net_rows in enumerate(rows):
        b = len(net_rows)
        error = means[i, :, :b].mean(dim=0) - torch.as_tensor(y[i, :b])
        rmse = float(error.square().mean().sqrt())
        ll = float(log_likelihood[i, :b].mean()) if log_likelihood is not None else None
        results.append({"rmse": rmse if math.isfinite(rmse) else None,
                        "log_likelihood": ll if ll is not None and math.isfinite(ll) else None})
    return results


def _evaluate_classification(model: StackedMLP, dataset: Dataset, rows: list[np.ndarray], blocks: np.ndarray,
                             block_of: list[int], samples: int, seed: int) -> list[dict]:
    """Classification metrics of net i on ``rows[i]`` (:data:`CLASSIFICATION_METRICS`).

    The nets are scored a few at a time so that their MC logits stay below
    :data:`_CLASSIFICATION_EVALUATION_ELEMENTS`; the masks of each group come from its own seed.
    """
    n_rows, n_classes = dataset.n_rows, model.n_outputs
    per_net = samples * max(len(r) for r in rows) * n_classes
    group = max(1, _CLASSIFICATION_EVALUATION_ELEMENTS // per_net)
    results: list[dict] = []
    for start in range(0, len(rows), group):
        nets = slice(start, min(start + group, len(rows)))
        part = model.subset(nets)
        widest = max(len(r) for r in rows[nets])
        x = np.zeros((nets.stop - nets.start, widest, dataset.n_features), dtype=np.float32)
        for k, net_rows in enumerate(rows[nets]):
            x[k, : len(net_rows)] = blocks[block_of[nets.start + k] * n_rows + net_rows]
        inputs = torch.as_tensor(x)
        group_seed = int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
        logits = predict_stacked(part, inputs, samples, group_seed)  # [G, T, B, C]
        deterministic = deterministic_stacked(part, inputs)  # [G, B, C]
        for k, net_rows in enumerate(rows[nets]):
            b = len(net_rows)
            report = evaluate_classification(logits[k, :, :b], deterministic[k, :b], dataset.target[net_rows])
            mc, det = report["mc"], report["deterministic"]
            results.append({
                **{name: mc[name] for name in ("accuracy", "nll", "brier", "ece",
                                               "auroc_predictive_entropy", "auroc_mutual_information")},
                **{f"deterministic_{name}": det[name] for name in ("accuracy", "nll", "brier", "ece")},
            })
    return results


def _run_phase(phase: str, plans: list[NetPlan], dataset: Dataset, spec: SweepCreate, checkpoint: Checkpoint,
               save: Callable[[Checkpoint, int], None], should_stop: Callable[[], bool], samples: int,
               epoch_offset: int) -> list[dict]:
    """Train the phase's nets stack by stack and score them: on their evaluation rows (validation
    or test), and in the search phase also on their training rows (classification) and, with
    ``test_every_configuration``, on the split's test rows (under the keys "train" and "test")."""
    seed = spec.training.seed or 0
    task = dataset.task
    classification = task == "classification"
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
        configs = [_net_config(p, spec, seed + 7919 * k, task) for k, p in enumerate(group_plans)]
        model = StackedMLP.from_configs(dataset.n_features, group_plans[0].configuration.hidden_layers, configs,
                                        activation=spec.model.activation,
                                        n_classes=dataset.n_classes if classification else None)
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
        group_metrics = _score(model, dataset, group_plans, blocks_x, stats, block_of, spec, samples, seed + g, phase)
        for i, value in zip(members, group_metrics):
            metrics[i] = value
        checkpoint.finished[key] = group_metrics
        checkpoint.phase, checkpoint.group, checkpoint.state = phase, g + 1, None
        save(checkpoint, epoch_offset + ((g + 1) * epochs) // len(groups))
    return [m or {name: None for name in metric_names(task)} for m in metrics]


def _score(model: StackedMLP, dataset: Dataset, plans: list[NetPlan], blocks: np.ndarray,
           stats: list[tuple[float, float]], block_of: list[int], spec: SweepCreate, samples: int, seed: int,
           phase: str) -> list[dict]:
    """Each net's metrics on its evaluation rows, plus "train" / "test" row sets in the search phase."""
    row_sets = {"": [p.eval_rows for p in plans]}
    if phase == "search" and dataset.task == "classification":
        row_sets[TRAIN] = [p.fit_rows for p in plans]
    if phase == "search" and spec.test_every_configuration and all(p.test_rows is not None for p in plans):
        row_sets[TEST] = [p.test_rows for p in plans]
    scored: dict[str, list[dict]] = {}
    for role, (name, rows) in enumerate(row_sets.items()):
        if dataset.task == "classification":
            role_seed = int(np.random.SeedSequence([seed, role]).generate_state(1)[0])
            scored[name] = _evaluate_classification(model, dataset, rows, blocks, block_of, samples, role_seed)
        else:  # the validation rows with the seed of earlier releases: the same numbers as before
            scored[name] = _evaluate(model, dataset, plans, rows, blocks, stats, block_of, spec, samples,
                                     seed if role == 0 else int(np.random.SeedSequence([seed, role]).generate_state(1)[0]))
    results = scored.pop("")
    for name, values in scored.items():
        for metrics, value in zip(results, values):
            metrics[name] = value
    return results


def run_sweep(dataset: Dataset, spec: SweepCreate, *, checkpoint: Checkpoint | None,
              save: Callable[[Checkpoint, int], None], should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Both phases; ``save(checkpoint, epochs_done)`` is called at epoch boundaries and after
    every finished stack, and a sweep resumed from a checkpoint continues where it stopped."""
    configurations = planning.configurations(spec)
    splits = planning.splits(spec, dataset.n_rows)
    fraction = spec.training.validation_fraction
    checkpoint = checkpoint or Checkpoint("search", 0, None, {})
    metric = spec.metric or planning.default_metric(dataset.task)
    search_plans = []
    for s, (train, test) in enumerate(splits):
        fit, validation = planning.search_rows(train, fraction)
        search_plans += [NetPlan(s, c, fit, validation, test) for c in configurations]
    if checkpoint.ranking is None:
        search = _run_phase("search", search_plans, dataset, spec, checkpoint, save, should_stop, spec.search_samples, 0)
        checkpoint.ranking = _rank(configurations, len(splits), search, metric)
        checkpoint.phase, checkpoint.group, checkpoint.state = "final", 0, None
        save(checkpoint, spec.training.epochs)
    results: dict[str, Any] = {"metric": metric, **checkpoint.ranking}
    if spec.retrain_best:
        best = checkpoint.ranking["best_per_split"]
        final_plans = [NetPlan(s, configurations[best[s]], train, test) for s, (train, test) in enumerate(splits)]
        final = _run_phase("final", final_plans, dataset, spec, checkpoint, save, should_stop, spec.test_samples, spec.training.epochs)
        results["test"] = {
            **_summaries(final, metric_names(dataset.task)),
            "samples": spec.test_samples,
            "per_split": [{"split": s, "configuration": best[s], **m} for s, m in enumerate(final)],
        }
    return results


def _summaries(values: list[dict], names: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """Mean ± SE over splits of each metric (missing or undefined values left out)."""
    return {name: planning.mean_and_standard_error([v.get(name) for v in values]) for name in names}


def _gaps(values: list[dict], names: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """Mean ± SE over splits of validation − train, per metric (paired by split)."""
    result = {}
    for name in names:
        differences = [v[name] - v[TRAIN][name] for v in values
                       if v.get(name) is not None and v[TRAIN].get(name) is not None]
        result[name] = planning.mean_and_standard_error(differences)
    return result


def _rank(configurations: list[planning.Configuration], n_splits: int, search: list[dict], metric: str) -> dict[str, Any]:
    n_configs = len(configurations)
    per_config = [[search[s * n_configs + c] for s in range(n_splits)] for c in range(n_configs)]
    names = tuple(name for name in search[0] if name not in (TRAIN, TEST))
    entries = []
    for c, values in enumerate(per_config):
        entry: dict[str, Any] = {"configuration": configurations[c].label(), "validation": _summaries(values, names)}
        if all(TRAIN in v for v in values):
            entry[TRAIN] = _summaries([v[TRAIN] for v in values], names)
            entry["gap"] = _gaps(values, names)
        if all(TEST in v for v in values):
            entry[TEST] = _summaries([v[TEST] for v in values], names)
        entry["per_split"] = values
        entries.append(entry)
    sign = -1.0 if planning.HIGHER_IS_BETTER[metric] else 1.0
    order = sorted(range(n_configs), key=lambda c: (entries[c]["validation"][metric]["mean"] is None,
                                                    sign * (entries[c]["validation"][metric]["mean"] or 0.0)))
    best_per_split = [planning.best_index([per_config[c][s][metric] for c in range(n_configs)], metric) for s in range(n_splits)]
    return {"ranking": [entries[c] for c in order], "best": configurations[order[0]].label(), "best_per_split": best_per_split}
