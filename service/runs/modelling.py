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
from service.ml.mc import (
    deterministic_outputs,
    sample_outputs,
    summarize_classification,
    summarize_regression,
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
    def _inputs(self, features: np.ndarray) -> torch.Tensor:
        standardised = self.input_scaler.transform(np.asarray(features, dtype=np.float32))
        return torch.as_tensor(standardised, dtype=torch.float32)

    def _to_target_units(self, outputs: torch.Tensor) -> torch.Tensor:
        assert self.target_scaler is not None
        mean = float(self.target_scaler.mean.reshape(-1)[0])
        scale = float(self.target_scaler.std.reshape(-1)[0])
        return outputs.squeeze(-1).to(torch.float64) * scale + mean

    def predict(self, features: np.ndarray, samples: int, seed: int | None) -> list[dict[str, Any]]:
        """MC dropout prediction, one dict per input row (fields of the API's outputs)."""
        x = self._inputs(features)
        outputs = sample_outputs(self.net, x, samples, seed)
        deterministic = deterministic_outputs(self.net, x)
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
        assert self.tau is not None
        summary = summarize_regression(self._to_target_units(outputs), self.tau)
        det_mean = self._to_target_units(deterministic).cpu().numpy()
        return [
            {
                "mean": float(summary.mean[i]),
                "std": float(summary.std[i]),
                "epistemic_std": float(summary.epistemic_std[i]),
                "aleatoric_std": summary.aleatoric_std,
                "interval_95": {"lower": float(summary.lower[i]), "upper": float(summary.upper[i])},
                "deterministic": {"mean": float(det_mean[i])},
            }
            for i in range(x.shape[0])
        ]


@dataclass
class TrainingJob:
    """Everything set up for training a run: the trainer plus the preprocessing it used."""

    trainer: Trainer
    model: TrainedModel
    x_val_raw: np.ndarray
    y_val_raw: np.ndarray
    x_train_raw: np.ndarray
    y_train_raw: np.ndarray
    given_tau: float | None

    def fit(
        self,
        on_epoch: Callable[[EpochMetrics], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[EpochMetrics]:
        return fit(self.trainer, on_epoch=on_epoch, should_stop=should_stop)

    def finish(self) -> TrainedModel:
        """After training: for regression without a given tau, estimate it from held-out residuals."""
        model = self.model
        model.net.eval()
        if model.task == "regression":
            if self.given_tau is not None:
                model.tau = self.given_tau
            else:
                # tau = 1 / mean squared residual of the deterministic net, on the validation
                # rows (the training rows when there are none), in target units.
                x, y = (self.x_val_raw, self.y_val_raw) if len(self.y_val_raw) else (self.x_train_raw, self.y_train_raw)
                with torch.inference_mode():
                    predicted = model._to_target_units(deterministic_outputs(model.net, model._inputs(x).to(_device(model.net)))).cpu().numpy()
                mse = float(np.mean((predicted - y.astype(np.float64)) ** 2))
                model.tau = 1.0 / max(mse, 1e-12)
        model.net.cpu()
        return model


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def resolve_seed(spec: RunCreate) -> int:
    assert spec.training.seed is not None, "the service fills in a seed when the run is created"
    return spec.training.seed


def prepare_training(dataset: Dataset, spec: RunCreate, device: str = "cpu") -> TrainingJob:
    """Split, standardise (on the training rows only), build the network and its trainer."""
    seed = resolve_seed(spec)
    train_idx, val_idx = split_indices(dataset.n_rows, spec.training.validation_fraction, seed)
    x_train, y_train = dataset.features[train_idx], dataset.target[train_idx]
    x_val, y_val = dataset.features[val_idx], dataset.target[val_idx]

    input_scaler = Standardizer.fit(x_train)
    target_scaler = None
    target_scale = 1.0
    if dataset.task == "regression":
        target_scaler = Standardizer.fit(y_train.reshape(-1, 1).astype(np.float32))
        target_scale = float(target_scaler.std.reshape(-1)[0])
        y_train_fit = target_scaler.transform(y_train.reshape(-1, 1).astype(np.float32)).reshape(-1)
        y_val_fit = target_scaler.transform(y_val.reshape(-1, 1).astype(np.float32)).reshape(-1)
    else:
        y_train_fit, y_val_fit = y_train, y_val

    network = NetworkSpec(
        n_inputs=dataset.n_features,
        n_outputs=dataset.n_classes if dataset.task == "classification" else 1,
        hidden_layers=tuple(spec.model.hidden_layers),
        dropout=tuple(spec.model.dropout_rates),
        input_dropout=spec.model.input_dropout,
        activation=spec.model.activation,
    )
    net = build_network(network, seed=seed)
    config = TrainingConfig(
        epochs=spec.training.epochs,
        batch_size=spec.training.batch_size,
        optimizer=spec.training.optimizer,
        learning_rate=spec.training.learning_rate,
        momentum=spec.training.momentum,
        weight_decay=spec.training.weight_decay,
        l1=spec.training.l1,
        seed=seed,
    )
    trainer = Trainer(
        net, dataset.task, input_scaler.transform(x_train), y_train_fit,
        input_scaler.transform(x_val), y_val_fit, config,
        target_scale=target_scale, device=device,
    )
    model = TrainedModel(
        task=dataset.task, network=network, net=net, input_scaler=input_scaler,
        target_scaler=target_scaler, tau=None, class_names=dataset.class_names,
    )
    return TrainingJob(trainer, model, x_val, y_val, x_train, y_train, spec.model.tau)
