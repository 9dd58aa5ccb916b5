"""From a run's spec and a dataset to a trained, servable model — and back from stored bytes.

Pure orchestration of service.ml (split, standardise, build, train, package); no database.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_weights
from safetensors.torch import save as save_weights

from service.ml.data import Dataset, Standardizer, split_indices
from service.ml.evaluation import evaluate_classification, evaluate_regression
from service.ml.mc import (
    deterministic_outputs,
    heteroscedastic_to_original_units,
    sample_outputs_and_deterministic,
    summarize_classification,
    summarize_regression,
    summarize_regression_heteroscedastic,
)
from service.ml.nets import NetworkSpec, build_network
from service.ml.training import EpochMetrics, Trainer, TrainingConfig, fit
from service.runs.schemas import RunCreate

WEIGHTS_FORMAT = "safetensors"


@dataclass
class TrainedModel:
    """A trained network with the preprocessing needed to serve it."""

    task: str
    network: NetworkSpec
    net: torch.nn.Sequential
    input_scaler: Standardizer
    target_scaler: Standardizer | None  # regression only
    tau: float | None  # regression only, in target units
    class_names: list[str] | None  # classification only
    tenant_id: str | None = None  # whose model this is (set when loaded for serving)

    # -- storage ------------------------------------------------------------------------
    def preprocessing(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "input_scaler": self.input_scaler.to_dict(),
            "target_scaler": self.target_scaler.to_dict() if self.target_scaler else None,
            "tau": self.tau,
            "class_names": self.class_names,
        }

    def weights_blob(self) -> bytes:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.net.state_dict().items()}
        return save_weights(state)

    @classmethod
    def from_stored(
        cls, network: dict[str, Any], preprocessing: dict[str, Any], weights: bytes,
        device: str | torch.device = "cpu",
    ) -> TrainedModel:
        spec = NetworkSpec.from_dict(network)
        net = build_network(spec)
        net.load_state_dict(load_weights(weights))  # safetensors: no pickle, no code execution
        net.to(device).eval()
        target = preprocessing.get("target_scaler")
        return cls(
            task=preprocessing["task"],
            network=spec,
            net=net,
            input_scaler=Standardizer.from_dict(preprocessing["input_scaler"]),
            target_scaler=Standardizer.from_dict(target) if target else None,
            tau=preprocessing.get("tau"),
            class_names=preprocessing.get("class_names"),
        )

    # -- prediction ---------------------------------------------------------------------
    @property
    def heteroscedastic(self) -> bool:
        return self.network.heteroscedastic

    def _inputs(self, features: np.ndarray) -> torch.Tensor:
        standardised = self.input_scaler.transform(np.asarray(features, dtype=np.float32))
        return torch.as_tensor(standardised, dtype=torch.float32)

    def _scale(self) -> tuple[float, float]:
        assert self.target_scaler is not None
        return float(self.target_scaler.mean.reshape(-1)[0]), float(self.target_scaler.std.reshape(-1)[0])

    def _target_mean(self, outputs: torch.Tensor) -> torch.Tensor:
        """The predicted mean in target units (first output), any leading dims."""
        shift, scale = self._scale()
        return outputs[..., 0].to(torch.float64) * scale + shift

    def _mean_and_log_variance(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heteroscedastic nets: predicted mean and noise log-variance in target units."""
        shift, scale = self._scale()
        return heteroscedastic_to_original_units(outputs, shift=shift, scale=scale)

    def _regression_summary(self, outputs: torch.Tensor):
        if self.heteroscedastic:
            return summarize_regression_heteroscedastic(*self._mean_and_log_variance(outputs))
        assert self.tau is not None
        return summarize_regression(self._target_mean(outputs), self.tau)

    def predict(self, features: np.ndarray, samples: int, seed: int | None) -> list[dict[str, Any]]:
        """MC dropout prediction, one dict per input row (fields of the API's outputs)."""
        x = self._inputs(features)
        outputs, deterministic = sample_outputs_and_deterministic(self.net, x, samples, seed)
        if self.task == "classification":
            summary = summarize_classification(outputs)
            det_probabilities = torch.softmax(deterministic.to(torch.float64), dim=-1).cpu().numpy()
            names = self.class_names or [str(i) for i in range(summary.probabilities.shape[1])]
            results = []
            for i in range(x.shape[0]):
                label = int(summary.label[i])
                det_label = int(det_probabilities[i].argmax())
                results.append({
                    "label": names[label],
                    "class_index": label,
                    "probabilities": summary.probabilities[i].tolist(),
                    "probabilities_std": summary.probabilities_std[i].tolist(),
                    "predictive_entropy": float(summary.predictive_entropy[i]),
                    "expected_entropy": float(summary.expected_entropy[i]),
                    "mutual_information": float(summary.mutual_information[i]),
                    "deterministic": {
                        "label": names[det_label],
                        "class_index": det_label,
                        "probabilities": det_probabilities[i].tolist(),
                    },
                })
            return results
        summary = self._regression_summary(outputs)
        aleatoric = np.broadcast_to(np.asarray(summary.aleatoric_std, dtype=np.float64), summary.mean.shape)
        det_mean = self._target_mean(deterministic).cpu().numpy()
        return [
            {
                "mean": float(summary.mean[i]),
                "std": float(summary.std[i]),
                "epistemic_std": float(summary.epistemic_std[i]),
                "aleatoric_std": float(aleatoric[i]),
                "interval_95": {"lower": float(summary.lower[i]), "upper": float(summary.upper[i])},
                "deterministic": {"mean": float(det_mean[i])},
            }
            for i in range(x.shape[0])
        ]

    def evaluate(self, features: np.ndarray, target: np.ndarray, *, samples: int, seed: int) -> dict[str, Any]:
        """Held-out metrics, MC dropout beside the deterministic net (service.ml.evaluation)."""
        x = self._inputs(features)
        outputs, deterministic = sample_outputs_and_deterministic(self.net, x, samples, seed)
        if self.task == "classification":
            return evaluate_classification(outputs, deterministic, np.asarray(target))
        if self.heteroscedastic:
            return evaluate_regression(
                self._mean_and_log_variance(outputs), self._mean_and_log_variance(deterministic),
                np.asarray(target, dtype=np.float64),
            )
        assert self.tau is not None
        return evaluate_regression(
            self._target_mean(outputs), self._target_mean(deterministic),
            np.asarray(target, dtype=np.float64), self.tau,
        )


@dataclass
class HeldOut:
    """Rows of the dataset in original units (features, target)."""

    features: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)


@dataclass
class TrainingJob:
    """Everything set up for training a run: the trainer plus the preprocessing it used."""

    trainer: Trainer
    model: TrainedModel
    train: HeldOut
    validation: HeldOut
    test: HeldOut
    given_tau: float | None

    def fit(
        self,
        on_epoch: Callable[[EpochMetrics], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[EpochMetrics]:
        return fit(self.trainer, on_epoch=on_epoch, should_stop=should_stop)

    def finish(self) -> TrainedModel:
        """After training: for regression without a given tau, estimate it from held-out
        residuals: tau = 1 / mean squared residual of the deterministic net on the validation
        rows (the training rows when there are none), in target units."""
        model = self.model
        model.net.eval()
        if model.task == "regression":
            if self.given_tau is not None:
                model.tau = self.given_tau
            else:
                rows = self.validation if len(self.validation) else self.train
                with torch.inference_mode():
                    outputs = deterministic_outputs(model.net, model._inputs(rows.features).to(_device(model.net)))
                predicted = model._target_mean(outputs).cpu().numpy()
                mse = float(np.mean((predicted - rows.target.astype(np.float64)) ** 2))
                model.tau = 1.0 / max(mse, 1e-12)
        model.net.cpu()
        return model

    def evaluate(self, samples: int, seed: int) -> dict[str, Any] | None:
        """MC dropout and deterministic metrics on the test rows (else the validation rows)."""
        rows, name = (self.test, "test") if len(self.test) else (self.validation, "validation")
        if not len(rows):
            return None
        report = self.model.evaluate(rows.features, rows.target, samples=samples, seed=seed)
        return {"rows": name, **report}


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def resolve_seed(spec: RunCreate) -> int:
    assert spec.training.seed is not None, "the service fills in a seed when the run is created"
    return spec.training.seed


def split_rows(n_rows: int, spec: RunCreate, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) row indices. With explicit train rows and no validation rows,
    the last ``validation_fraction`` of the train rows validate (the UCI protocol)."""
    fraction = spec.training.validation_fraction
    if spec.split is None:
        train, validation = split_indices(n_rows, fraction, seed)
        return train, validation, np.empty(0, dtype=np.int64)
    train = np.asarray(spec.split.train_indices, dtype=np.int64)
    if spec.split.validation_indices is not None:
        validation = np.asarray(spec.split.validation_indices, dtype=np.int64)
    else:
        n_validation = round(fraction * len(train))
        validation = train[len(train) - n_validation:]
        train = train[: len(train) - n_validation]
    test = np.asarray(spec.split.test_indices or [], dtype=np.int64)
    return train, validation, test


def prior_weight_decay(lengthscale: float, dropout: float, n_train: int, tau: float) -> float:
    """Gal & Ghahramani's L2 coefficient reg = l²(1 − p) / (2 N τ) as our weight_decay (the
    penalty (weight_decay/2)·Σ‖W‖² equals reg·Σ‖W‖², so weight_decay = 2·reg)."""
    return lengthscale**2 * (1.0 - dropout) / (n_train * tau)


def prepare_training(dataset: Dataset, spec: RunCreate, device: str = "cpu") -> TrainingJob:
    """Split, standardise (on the training rows only), build the network and its trainer."""
    seed = resolve_seed(spec)
    train_idx, val_idx, test_idx = split_rows(dataset.n_rows, spec, seed)
    train = HeldOut(dataset.features[train_idx], dataset.target[train_idx])
    validation = HeldOut(dataset.features[val_idx], dataset.target[val_idx])
    test = HeldOut(dataset.features[test_idx], dataset.target[test_idx])

    input_scaler = Standardizer.fit(train.features)
    target_scaler = None
    target_scale = 1.0
    if dataset.task == "regression":
        target_scaler = Standardizer.fit(train.target.reshape(-1, 1).astype(np.float32))
        target_scale = float(target_scaler.std.reshape(-1)[0])
        y_train_fit = target_scaler.transform(train.target.reshape(-1, 1).astype(np.float32)).reshape(-1)
        y_val_fit = target_scaler.transform(validation.target.reshape(-1, 1).astype(np.float32)).reshape(-1)
    else:
        y_train_fit, y_val_fit = train.target, validation.target

    heteroscedastic = dataset.task == "regression" and spec.model.heteroscedastic
    network = NetworkSpec(
        n_inputs=dataset.n_features,
        n_outputs=dataset.n_classes if dataset.task == "classification" else (2 if heteroscedastic else 1),
        hidden_layers=tuple(spec.model.hidden_layers),
        dropout=tuple(spec.model.dropout_rates),
        input_dropout=spec.model.input_dropout,
        activation=spec.model.activation,
        heteroscedastic=heteroscedastic,
    )
    net = build_network(network, seed=seed)
    weight_decay = spec.training.weight_decay
    if spec.model.prior_lengthscale is not None and spec.model.tau is not None:
        weight_decay = prior_weight_decay(
            spec.model.prior_lengthscale, spec.model.dropout_rates[0], len(train), spec.model.tau
        )
    config = TrainingConfig(
        epochs=spec.training.epochs,
        batch_size=spec.training.batch_size,
        optimizer=spec.training.optimizer,
        learning_rate=spec.training.learning_rate,
        momentum=spec.training.momentum,
        weight_decay=weight_decay,
        l1=spec.training.l1,
        seed=seed,
    )
    trainer = Trainer(
        net, dataset.task, input_scaler.transform(train.features), y_train_fit,
        input_scaler.transform(validation.features), y_val_fit, config,
        target_scale=target_scale, device=device, heteroscedastic=heteroscedastic,
    )
    model = TrainedModel(
        task=dataset.task, network=network, net=net, input_scaler=input_scaler,
        target_scaler=target_scaler, tau=None, class_names=dataset.class_names,
    )
    return TrainingJob(trainer, model, train, validation, test, spec.model.tau)
