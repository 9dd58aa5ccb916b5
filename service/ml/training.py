"""Reproducible, resumable minibatch training of dropout networks.

Objective per batch (the data loss is the mean over the batch's rows)::

    data_loss + (weight_decay / 2) * sum_W ||W||_2^2 + l1 * sum_W |W|_1

where W runs over the weight matrices of the ``nn.Linear`` layers only (biases are not
penalised). The data loss is the cross-entropy of the logits for classification and the
squared error on the *standardised* target for regression. For a heteroscedastic regression net
(outputs ``mu`` and ``s = log sigma^2``, Kendall & Gal 2017) it is the Gaussian negative
log-likelihood ``0.5 * (s + (y - mu)^2 * exp(-s))`` on the standardised target (the constant
``0.5 * log(2 pi)`` omitted). The gradient of the L2 term is
``weight_decay * W``, as with torch's ``weight_decay`` but on weights only; the optimizer's own
``weight_decay`` is not used.

Reproducibility: epoch ``e`` (1-based) draws its shuffling permutation and all its dropout
masks from one seed derived from ``(config.seed, e)``, so its result depends only on the
weights, the optimizer state, the seed and ``e``. A run resumed from ``Trainer.state_dict()``
after any epoch ends bit-identical to an uninterrupted one (same device, same torch build).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.ml.nets import TASKS, Task, seeded_rng

ArrayLike = Tensor | np.ndarray

_EVAL_BATCH_ROWS = 8192
# Devices where torch.optim.Adam and SGD have fused kernels.
_FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


class TrainingError(Exception):
    """Base class of the errors raised by the training loop."""


class NonFiniteLossError(TrainingError):
    """A batch loss was NaN or infinite (epoch and batch are 1-based)."""

    def __init__(self, epoch: int, batch: int) -> None:
        super().__init__(f"non-finite loss in epoch {epoch}, batch {batch}")
        self.epoch = epoch
        self.batch = batch


class TrainingCancelled(TrainingError):
    """``should_stop`` returned True; ``epochs_done`` epochs are complete.

    When raised mid-epoch the weights are partly updated: resume from the last checkpoint.
    """

    def __init__(self, epochs_done: int, mid_epoch: bool) -> None:
        where = "during" if mid_epoch else "before"
        super().__init__(f"training cancelled {where} epoch {epochs_done + 1}")
        self.epochs_done = epochs_done
        self.mid_epoch = mid_epoch


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings; see the module docstring for the regularisation terms."""

    epochs: int
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    l1: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("momentum", "weight_decay", "l1"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        return cls(**data)


@dataclass
class EpochMetrics:
    """Metrics of one epoch (``epoch`` is 1-based).

    ``train_*`` are means over the epoch's rows with dropout on, data loss only (no penalty);
    ``val_*`` come from the deterministic net (eval mode) on the validation rows and are None
    without validation rows. Accuracies are for classification, RMSEs (in original target
    units) for regression; the others are None. For a heteroscedastic net the losses are the
    Gaussian negative log-likelihood and the RMSEs are those of the predicted mean.
    """

    epoch: int
    train_loss: float
    val_loss: float | None
    train_accuracy: float | None
    val_accuracy: float | None
    train_rmse: float | None
    val_rmse: float | None
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed for the shuffling and dropout masks of ``epoch`` (1-based) of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class Trainer:
    """Trains ``net`` one epoch at a time; inputs must already be standardised by the caller.

    ``y`` holds class indices for classification and the standardised target for regression;
    ``target_scale`` (the target's std) converts RMSE back to original units. ``x_val`` /
    ``y_val`` may be None or empty. ``heteroscedastic=True`` (regression only) trains a net
    whose two outputs are the mean and the log-variance of the standardised target.
    """

    def __init__(
        self,
        net: nn.Module,
        task: Task,
        x_train: ArrayLike,
        y_train: ArrayLike,
        x_val: ArrayLike | None,
        y_val: ArrayLike | None,
        config: TrainingConfig,
        *,
        target_scale: float = 1.0,
        device: str | torch.device = "cpu",
        heteroscedastic: bool = False,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if heteroscedastic and task != "regression":
            raise ValueError("heteroscedastic training is for regression only")
        self.heteroscedastic = bool(heteroscedastic)
        self.device = torch.device(device)
        self.net = net.to(self.device)
        self.task = task
        self.config = config
        self.target_scale = float(target_scale)
        target_dtype = torch.int64 if task == "classification" else torch.float32
        self.x_train = self._tensor(x_train, torch.float32)
        self.y_train = self._target(y_train, target_dtype)
        if len(self.x_train) != len(self.y_train) or len(self.x_train) == 0:
            raise ValueError("x_train and y_train need the same, non-zero number of rows")
        self.x_val = self.y_val = None
        if x_val is not None and y_val is not None and len(x_val) > 0:
            self.x_val = self._tensor(x_val, torch.float32)
            self.y_val = self._target(y_val, target_dtype)
            if len(self.x_val) != len(self.y_val):
                raise ValueError("x_val and y_val need the same number of rows")
        self.weights = [m.weight for m in self.net.modules() if isinstance(m, nn.Linear)]
        params = self.net.parameters()
        # torch's fused kernels: one per parameter per step instead of one per arithmetic step of the
        # update (the textbook net trains ~1.2x faster per epoch on the CPU). The same update rule;
        # rounding may differ in the last bits from the unfused one. A checkpoint keeps the flag, so a
        # run resumes with the implementation it started with.
        fused = {"fused": True} if self.device.type in _FUSED_OPTIMIZER_DEVICES else {}
        if config.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.learning_rate, **fused)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum, **fused)
        self.epochs_done = 0

    def _tensor(self, values: ArrayLike, dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(values).to(device=self.device, dtype=dtype)

    def _target(self, values: ArrayLike, dtype: torch.dtype) -> Tensor:
        target = self._tensor(values, dtype)
        if target.ndim == 2 and target.shape[1] == 1:
            target = target[:, 0]
        if target.ndim != 1:
            raise ValueError(f"targets must have shape [N], got {tuple(target.shape)}")
        return target

    def data_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of the logits, mean squared error on the standardised target, or
        (heteroscedastic) mean ``0.5 * (log_variance + (y - mean)^2 / variance)``."""
        if self.task == "classification":
            return F.cross_entropy(outputs, targets)
        if self.heteroscedastic:
            mean, log_variance = self._mean_and_log_variance(outputs)
            return 0.5 * (log_variance + (targets - mean).square() * torch.exp(-log_variance)).mean()
        return F.mse_loss(outputs.squeeze(-1), targets)

    def _mean_and_log_variance(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        if outputs.ndim != 2 or outputs.shape[1] != 2:
            raise ValueError(f"a heteroscedastic net must output [batch, 2], got {tuple(outputs.shape)}")
        return outputs[:, 0], outputs[:, 1]

    def _squared_error_sum(self, outputs: Tensor, targets: Tensor) -> float:
        """Sum of squared errors of the predicted mean (heteroscedastic nets only)."""
        mean, _ = self._mean_and_log_variance(outputs)
        return float((mean - targets).square().sum())

    def penalty(self) -> Tensor | None:
        """``(weight_decay / 2) * sum ||W||^2 + l1 * sum |W|`` over the Linear weight matrices; None
        when both are 0 (nothing to add to the loss)."""
        if not (self.config.weight_decay or self.config.l1):
            return None
        total = torch.zeros((), device=self.device)
        if self.config.weight_decay:
            total = total + 0.5 * self.config.weight_decay * sum(w.square().sum() for w in self.weights)
        if self.config.l1:
            total = total + self.config.l1 * sum(w.abs().sum() for w in self.weights)
        return total

    def run_epoch(self, should_stop: Callable[[], bool] | None = None) -> EpochMetrics:
        """Train one epoch; ``should_stop`` is polled before each batch (raises TrainingCancelled).

        The net is in train mode during the epoch and left in eval mode afterwards.
        """
        epoch = self.epochs_done + 1
        started = time.perf_counter()
        seed = epoch_seed(self.config.seed, epoch)
        n_rows = len(self.x_train)
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).to(self.device)
        loss_sum = 0.0
        squared_error_sum = 0.0
        # Counted on the device: one host sync per batch (the loss's finiteness check), not two.
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with seeded_rng(seed, self.device):
            self.net.train()
            try:
                for batch, start in enumerate(range(0, n_rows, self.config.batch_size), start=1):
                    if should_stop is not None and should_stop():
                        raise TrainingCancelled(self.epochs_done, mid_epoch=True)
                    rows = order[start : start + self.config.batch_size]
                    inputs, targets = self.x_train[rows], self.y_train[rows]
                    outputs = self.net(inputs)
                    data_loss = self.data_loss(outputs, targets)
                    penalty = self.penalty()
                    loss = data_loss if penalty is None else data_loss + penalty
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError(epoch, batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    loss_sum += (loss_value if penalty is None else data_loss.item()) * len(rows)
                    if self.task == "classification":
                        correct += (outputs.detach().argmax(-1) == targets).sum()
                    elif self.heteroscedastic:
                        squared_error_sum += self._squared_error_sum(outputs.detach(), targets)
            finally:
                self.net.eval()
        train_loss = loss_sum / n_rows
        val_loss, val_correct, val_squared_error_sum = self._evaluate()
        classification = self.task == "classification"
        n_val = 0 if self.x_val is None else len(self.x_val)
        train_rmse = val_rmse = None
        if not classification:
            if self.heteroscedastic:
                train_rmse = math.sqrt(squared_error_sum / n_rows) * self.target_scale
                if val_loss is not None:
                    val_rmse = math.sqrt(val_squared_error_sum / n_val) * self.target_scale
            else:
                train_rmse = math.sqrt(train_loss) * self.target_scale
                if val_loss is not None:
                    val_rmse = math.sqrt(val_loss) * self.target_scale
        self.epochs_done = epoch
        return EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            train_accuracy=int(correct) / n_rows if classification else None,
            val_accuracy=val_correct / n_val if classification and val_loss is not None else None,
            train_rmse=train_rmse,
            val_rmse=val_rmse,
            duration_s=time.perf_counter() - started,
        )

    def _evaluate(self) -> tuple[float | None, int, float]:
        """Mean data loss, number of correct labels and (heteroscedastic) sum of squared errors of
        the deterministic net on the validation rows."""
        if self.x_val is None or self.y_val is None:
            return None, 0, 0.0
        loss_sum, correct, squared_error_sum = 0.0, 0, 0.0
        with torch.inference_mode():
            for start in range(0, len(self.x_val), _EVAL_BATCH_ROWS):
                inputs = self.x_val[start : start + _EVAL_BATCH_ROWS]
                targets = self.y_val[start : start + _EVAL_BATCH_ROWS]
                outputs = self.net(inputs)
                loss_sum += self.data_loss(outputs, targets).item() * len(inputs)
                if self.task == "classification":
                    correct += int((outputs.argmax(-1) == targets).sum())
                elif self.heteroscedastic:
                    squared_error_sum += self._squared_error_sum(outputs, targets)
        return loss_sum / len(self.x_val), correct, squared_error_sum

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint: ``{"epoch", "model", "optimizer"}`` (references, not copies)."""
        return {
            "epoch": self.epochs_done,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epochs_done = int(state["epoch"])


def fit(
    trainer: Trainer,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[EpochMetrics]:
    """Run the remaining epochs (``trainer.epochs_done + 1 .. config.epochs``).

    ``on_epoch`` is called after each epoch (e.g. to checkpoint); ``should_stop`` is polled
    before each epoch and between batches, and a True answer raises :class:`TrainingCancelled`.
    """
    history: list[EpochMetrics] = []
    while trainer.epochs_done < trainer.config.epochs:
        if should_stop is not None and should_stop():
            raise TrainingCancelled(trainer.epochs_done, mid_epoch=False)
        metrics = trainer.run_epoch(should_stop)
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    return history
