"""Sweep engine: train many small dropout MLPs of one architecture at once.

A hyper-parameter grid times a set of data splits is a few hundred tiny networks (the UCI
regression protocol of Gal & Ghahramani 2016: 13 inputs -> 50 ReLU units -> 1 output). Trained
one after another, each step is dominated by Python and dispatch overhead; here the M networks
live in stacked tensors (weights ``[M, in, out]``, biases ``[M, 1, out]``) and every layer is one
batched matrix product (``torch.baddbmm``) for all nets.

Training (:func:`train_stacked`) is the objective of :mod:`service.ml.training`, net by net::

    data_loss + (weight_decay / 2) * sum_W ||W||^2 + l1 * sum_W |W|_1      (weights only)

with, for regression, the mean squared error on the standardised target as ``data_loss`` (or,
for ``heteroscedastic`` nets, the Trainer's Gaussian negative log-likelihood
``0.5 (log_variance + (y - mean)^2 / variance)`` of a predicted mean and log-variance), and for
classification (a stack with ``task="classification"`` and one logit per class) the mean
softmax cross-entropy of the class indices, as ``F.cross_entropy``. The stacked loss is the sum
over nets, so every gradient stays per net; the gradients are computed by hand (no autograd
graph) and Adam (torch defaults) runs elementwise on the stacked tensors with a per-net learning
rate and step count. A net's trajectory depends only on its own config, initial weights and
rows: changing another net of the stack changes nothing (bit for bit).

Randomness, per net and epoch ``e`` (1-based), all derived from
``training.epoch_seed(config.seed, e)`` (so a resumed run is bit-identical):

* the shuffle is ``torch.randperm`` with a generator seeded by that value, exactly as
  :class:`service.ml.training.Trainer` does, so a net sees its rows in the same order as when
  trained alone with the Trainer (``x_train = x[train_index]``);
* the dropout masks come from a numpy ``SFC64`` stream seeded from the same value (16 random
  bits per unit; cheaper than ``torch.rand``, which matters because mask bits are a large part
  of the work). A unit is kept when its 16-bit draw falls below ``round((1 - p) * 2**16)``,
  so each rate is rounded to a multiple of 2**-16 (|error| <= 7.7e-6), and kept units are scaled
  by the exact inverse of the rounded keep probability (inverted dropout, unbiased).

The masks therefore differ from those of the Trainer (which uses torch's global RNG); training
a net here or with the Trainer gives statistically equivalent, not identical, results, and
identical ones (up to float rounding) without dropout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.ml.nets import ACTIVATIONS, TASKS, Activation, NetworkSpec, Task, build_network
from service.ml.training import TrainingCancelled, epoch_seed

ArrayLike = Tensor | np.ndarray

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

# 16-bit dropout draws: a unit is kept when its draw (uniform over int16) is <= its threshold.
_MASK_LEVELS = 1 << 16
# Bytes of mask bits drawn at a time during training (several steps per chunk).
_MASK_CHUNK_BYTES = 16 << 20
# Activation bytes of one group of nets in a training step (smaller groups stay in cache).
_GROUP_BYTES = 16 << 20
# Largest activation, in elements, of one chunk of MC samples.
_PREDICT_MAX_ELEMENTS = 1 << 22

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True, kw_only=True)
class NetConfig:
    """Hyper-parameters of one net of a sweep.

    ``dropout`` is the rate after every hidden layer, ``input_dropout`` the rate on the inputs.
    ``weight_decay`` and ``l1`` follow :mod:`service.ml.training` (penalty
    ``(weight_decay / 2) * sum ||W||^2 + l1 * sum |W|`` on the weight matrices, not the biases):
    the paper's ``reg * sum ||W||^2`` is ``weight_decay = 2 * reg``, see
    :func:`weight_decay_from_prior`. ``seed`` sets the initial weights (as
    ``build_network(spec, seed)``), the shuffling and the dropout masks. ``heteroscedastic``
    nets output a mean and a log-variance and are trained with the Gaussian negative
    log-likelihood.
    """

    dropout: float
    input_dropout: float
    weight_decay: float
    l1: float = 0.0
    learning_rate: float
    seed: int
    heteroscedastic: bool = False

    def __post_init__(self) -> None:
        for name in ("dropout", "input_dropout"):
            rate = getattr(self, name)
            if not (math.isfinite(rate) and 0.0 <= rate < 1.0):
                raise ValueError(f"{name} must be a dropout rate in [0, 1), got {rate!r}")
        for name in ("weight_decay", "l1"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


def weight_decay_from_prior(prior_lengthscale: float, dropout_rate: float, n_rows: int, tau: float) -> float:
    """``weight_decay`` of the MC dropout paper's prior: ``2 * reg`` with ``reg = l^2 (1 - p) / (2 N tau)``."""
    return prior_lengthscale**2 * (1.0 - dropout_rate) / (n_rows * tau)


# ---------------------------------------------------------------------------------------------
# Dropout masks from 16-bit draws


def _keep_counts(rates: Tensor) -> Tensor:
    """Keep probability of each rate in units of 2**-16 (int64, in [1, 2**16])."""
    counts = torch.round((1.0 - rates.to(torch.float64)) * _MASK_LEVELS).to(torch.int64)
    return counts.clamp_(1, _MASK_LEVELS)


def _keep_thresholds(rates: Tensor) -> Tensor:
    """int16 thresholds: a draw ``d`` (uniform over int16) keeps the unit when ``d <= threshold``."""
    return (_keep_counts(rates) - (_MASK_LEVELS // 2 + 1)).to(torch.int16)


def _keep_scales(rates: Tensor) -> Tensor:
    """float32 inverse of the rounded keep probabilities (exactly 1 for rate 0)."""
    return (_MASK_LEVELS / _keep_counts(rates).to(torch.float64)).to(torch.float32)


# numpy's SeedSequence (pool of 4 uint32 words), for epoch_seed on many nets at once.
_HASH_INIT_A, _HASH_MULT_A = 0x43B0D7E5, 0x931E8875
_HASH_INIT_B, _HASH_MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_MASK32 = 0xFFFFFFFF


def epoch_seeds(seeds: Sequence[int], epoch: int) -> list[int]:
    """``[training.epoch_seed(seed, epoch) for seed in seeds]``, vectorised over the seeds.

    Reimplements ``np.random.SeedSequence([seed, epoch]).generate_state(1)`` for seeds and
    epochs below 2**32 (larger ones fall back to :func:`~service.ml.training.epoch_seed`).
    """
    values = np.asarray(seeds, dtype=object)
    small = np.array([0 <= int(s) <= _MASK32 for s in values], dtype=bool) & (0 <= epoch <= _MASK32)
    result = [0] * len(values)
    if small.any():
        hash_const = _HASH_INIT_A

        def hashmix(value: np.ndarray) -> np.ndarray:
            nonlocal hash_const
            value = value ^ np.uint64(hash_const)
            hash_const = (hash_const * _HASH_MULT_A) & _MASK32
            value = (value * np.uint64(hash_const)) & np.uint64(_MASK32)
            return value ^ (value >> np.uint64(16))

        def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            result = (np.uint64(_MIX_MULT_L) * x - np.uint64(_MIX_MULT_R) * y) & np.uint64(_MASK32)
            return result ^ (result >> np.uint64(16))

        words = np.array([int(s) for s in values[small]], dtype=np.uint64)
        entropy = [words, np.full_like(words, epoch)]
        zero = np.zeros_like(words)
        with np.errstate(over="ignore"):
            pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(4)]
            for source in range(4):
                for target in range(4):
                    if source != target:
                        pool[target] = mix(pool[target], hashmix(pool[source]))
            state = pool[0] ^ np.uint64(_HASH_INIT_B)
            state = (state * np.uint64((_HASH_INIT_B * _HASH_MULT_B) & _MASK32)) & np.uint64(_MASK32)
            state ^= state >> np.uint64(16)
        for position, value in zip(np.flatnonzero(small), state.tolist()):
            result[position] = int(value)
    for position in np.flatnonzero(~small):
        result[position] = epoch_seed(int(values[position]), epoch)
    return result


_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _splitmix64(state: np.ndarray, count: int) -> np.ndarray:
    """``count`` successive splitmix64 outputs for each uint64 in ``state``: ``[len(state), count]``."""
    outputs = np.empty((len(state), count), dtype=np.uint64)
    state = state.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        for i in range(count):
            state += _SPLITMIX_GAMMA
            z = state.copy()
            z ^= z >> np.uint64(30)
            z *= _SPLITMIX_MULTIPLIERS[0]
            z ^= z >> np.uint64(27)
            z *= _SPLITMIX_MULTIPLIERS[1]
            z ^= z >> np.uint64(31)
            outputs[:, i] = z
    return outputs


class _MaskStreams:
    """One SFC64 bit stream per net, re-seeded from a 64-bit value per net (e.g. per epoch)."""

    def __init__(self, generators: list[np.random.SFC64]) -> None:
        self.generators = generators

    def seed(self, seeds: Sequence[int]) -> None:
        words = _splitmix64(np.asarray(seeds, dtype=np.uint64), 3)
        for generator, (a, b, c) in zip(self.generators, words):
            generator.state = {
                "bit_generator": "SFC64",
                "state": {"state": np.array([a, b, c, 1], dtype=np.uint64)},
                "has_uint32": 0,
                "uinteger": 0,
            }

    def fill(self, bits: np.ndarray, words: Sequence[int]) -> None:
        """Write the next ``words[i]`` uint64 of stream i into ``bits[i, :words[i]]``."""
        for i, (generator, count) in enumerate(zip(self.generators, words)):
            if count > 0:
                bits[i, :count] = generator.random_raw(count)


# ---------------------------------------------------------------------------------------------
# The stacked network


def _activation(name: str, z: Tensor) -> Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "tanh":
        return torch.tanh(z)
    return nn.functional.gelu(z)


class StackedMLP(nn.Module):
    """M fully connected dropout networks of one architecture, evaluated together.

    Layer k of net i has weight ``weights[k][i]`` of shape ``[in, out]`` (the transpose of
    ``nn.Linear.weight``) and bias ``biases[k][i]`` of shape ``[1, out]``. ``input_dropout_rate``
    and ``dropout_rate`` (buffers ``[M]``, float64) are each net's rate on the inputs and after
    every hidden layer. Net i starts from exactly the weights of
    ``build_network(NetworkSpec(...), seed=seeds[i])``. A ``heteroscedastic`` stack has two
    outputs, the mean and log-variance of the (standardised) target.

    A ``task="classification"`` stack outputs one logit per class (``n_outputs`` classes) and is
    trained with the softmax cross-entropy.

    ``forward`` takes ``[M, B, in]`` (or shared inputs ``[B, in]``) and returns ``[M, B, out]``;
    in train mode it applies dropout with masks of its own per net and row, drawn from
    ``generator`` (torch's global RNG by default). :func:`train_stacked` does not use
    ``forward``: it has its own, faster pass with hand-written gradients.
    """

    def __init__(
        self,
        n_inputs: int,
        hidden_layers: Sequence[int],
        n_outputs: int,
        *,
        seeds: Sequence[int],
        dropout_rate: Sequence[float] | Tensor | float = 0.0,
        input_dropout_rate: Sequence[float] | Tensor | float = 0.0,
        activation: Activation = "relu",
        heteroscedastic: bool = False,
        task: Task = "regression",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if heteroscedastic and task != "regression":
            raise ValueError("a heteroscedastic stack is for regression only")
        if heteroscedastic and n_outputs != 2:
            raise ValueError(f"a heteroscedastic stack needs n_outputs=2 (mean, log-variance), got {n_outputs}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        seeds = [int(seed) for seed in seeds]
        if not seeds:
            raise ValueError("a stack needs at least one net (one seed per net)")
        self.n_inputs = int(n_inputs)
        self.hidden_layers = tuple(int(width) for width in hidden_layers)
        self.n_outputs = int(n_outputs)
        self.activation: Activation = activation
        self.heteroscedastic = bool(heteroscedastic)
        self.task: Task = task
        n_nets = len(seeds)
        # The spec only serves to build the reference nets; dropout modules draw no random numbers.
        spec = NetworkSpec(self.n_inputs, self.n_outputs, self.hidden_layers, (0.0,) * len(self.hidden_layers),
                           activation=activation)
        layers = [[m for m in build_network(spec, seed=seed) if isinstance(m, nn.Linear)] for seed in seeds]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([net[k].weight.detach().t() for net in layers]).contiguous())
            for k in range(len(self.hidden_layers) + 1)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([net[k].bias.detach() for net in layers]).unsqueeze(1).contiguous())
            for k in range(len(self.hidden_layers) + 1)
        )
        self.register_buffer("dropout_rate", self._rates(dropout_rate, n_nets, "dropout_rate"))
        self.register_buffer("input_dropout_rate", self._rates(input_dropout_rate, n_nets, "input_dropout_rate"))
        self.eval()

    @staticmethod
    def _rates(rates: Sequence[float] | Tensor | float, n_nets: int, name: str) -> Tensor:
        tensor = torch.as_tensor(rates, dtype=torch.float64).detach().clone()
        if tensor.ndim == 0:
            tensor = tensor.expand(n_nets).clone()
        if tensor.shape != (n_nets,):
            raise ValueError(f"{name} needs one rate per net ({n_nets}), got shape {tuple(tensor.shape)}")
        if not bool(((tensor >= 0) & (tensor < 1)).all()):
            raise ValueError(f"{name} must be dropout rates in [0, 1)")
        return tensor

    @classmethod
    def from_configs(
        cls,
        n_inputs: int,
        hidden_layers: Sequence[int],
        configs: Sequence[NetConfig],
        *,
        activation: Activation = "relu",
        n_classes: int | None = None,
    ) -> StackedMLP:
        """Nets for ``configs``: with ``n_classes``, classifiers with one logit per class; else
        regression nets with one output, or mean and log-variance if heteroscedastic."""
        heteroscedastic = _common_heteroscedastic(configs)
        if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2):
            raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
        if n_classes is not None and heteroscedastic:
            raise ValueError("heteroscedastic nets are for regression only, not with n_classes")
        return cls(
            n_inputs, hidden_layers, n_classes if n_classes is not None else (2 if heteroscedastic else 1),
            seeds=[c.seed for c in configs],
            dropout_rate=[c.dropout for c in configs],
            input_dropout_rate=[c.input_dropout for c in configs],
            activation=activation,
            heteroscedastic=heteroscedastic,
            task="regression" if n_classes is None else "classification",
        )

    def subset(self, nets: slice) -> StackedMLP:
        """A new stack holding copies of the nets ``nets`` (weights, biases and rates)."""
        start, stop, step = nets.indices(self.n_nets)
        if step != 1 or stop <= start:
            raise ValueError(f"nets must be a non-empty contiguous slice of the {self.n_nets} nets, got {nets}")
        part = StackedMLP(
            self.n_inputs, self.hidden_layers, self.n_outputs, seeds=[0] * (stop - start),
            dropout_rate=self.dropout_rate[start:stop], input_dropout_rate=self.input_dropout_rate[start:stop],
            activation=self.activation, heteroscedastic=self.heteroscedastic, task=self.task,
        ).to(self.weights[0].device)
        with torch.no_grad():
            for mine, theirs in zip(part.parameters(), self.parameters()):
                mine.copy_(theirs[start:stop])
        return part

    @property
    def n_nets(self) -> int:
        return int(self.weights[0].shape[0])

    def site_rates(self) -> list[Tensor]:
        """Dropout rates ``[M]`` in front of each layer: the inputs, then every hidden layer."""
        return [self.input_dropout_rate] + [self.dropout_rate] * len(self.hidden_layers)

    def batched_inputs(self, x: ArrayLike) -> Tensor:
        """``[M, B, in]`` float32 on the model's device; shared ``[B, in]`` inputs are expanded."""
        x = torch.as_tensor(x).to(device=self.weights[0].device, dtype=torch.float32)
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(self.n_nets, *x.shape)
        if x.ndim != 3 or x.shape[0] != self.n_nets or x.shape[2] != self.n_inputs:
            raise ValueError(
                f"inputs must have shape [{self.n_nets}, B, {self.n_inputs}] or [B, {self.n_inputs}], "
                f"got {tuple(x.shape)}"
            )
        return x

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.outputs(x, dropout=self.training, generator=generator)

    def outputs(self, x: ArrayLike, *, dropout: bool, generator: torch.Generator | None = None) -> Tensor:
        """``forward`` with dropout on or off regardless of the module's mode (writes no flags)."""
        hidden = self.batched_inputs(x)
        last = len(self.weights) - 1
        for k, (weight, bias, rates) in enumerate(zip(self.weights, self.biases, self.site_rates())):
            if dropout and bool((rates > 0).any()):
                draws = torch.randint(-(1 << 15), 1 << 15, hidden.shape, dtype=torch.int16,
                                      generator=generator, device=hidden.device)
                keep = draws <= _keep_thresholds(rates).to(hidden.device).view(-1, 1, 1)
                hidden = hidden * keep * _keep_scales(rates).to(hidden.device).view(-1, 1, 1)
            hidden = torch.baddbmm(bias, hidden, weight)
            if k < last:
                hidden = _activation(self.activation, hidden)
        return hidden

    def network_spec(self, index: int) -> NetworkSpec:
        """The :class:`NetworkSpec` of net ``index`` (its rates as stored, before 2**-16 rounding)."""
        return NetworkSpec(
            n_inputs=self.n_inputs,
            n_outputs=self.n_outputs,
            hidden_layers=self.hidden_layers,
            dropout=(float(self.dropout_rate[index]),) * len(self.hidden_layers),
            input_dropout=float(self.input_dropout_rate[index]),
            activation=self.activation,
            heteroscedastic=self.heteroscedastic,
        )

    def to_network(self, index: int) -> nn.Sequential:
        """Net ``index`` as the ``nn.Sequential`` of ``build_network`` (for the service's MC tools)."""
        net = build_network(self.network_spec(index))
        linears = [m for m in net if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for linear, weight, bias in zip(linears, self.weights, self.biases):
                linear.weight.copy_(weight[index].t())
                linear.bias.copy_(bias[index, 0])
        return net


def _common_heteroscedastic(configs: Sequence[NetConfig]) -> bool:
    flags = {c.heteroscedastic for c in configs}
    if len(flags) > 1:
        raise ValueError("all nets of a stack must agree on heteroscedastic (the output width is shared)")
    return flags.pop() if flags else False


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class StackedTrainingState:
    """Checkpoint of :func:`train_stacked` after ``epochs_done`` epochs.

    ``model`` is ``StackedMLP.state_dict()``; ``exp_avg`` / ``exp_avg_sq`` are the Adam moments
    of all parameters flattened per net (``[M, P]``, in ``StackedMLP.parameters()`` order);
    ``steps`` the Adam steps each net has taken (``[M]``, int64); ``train_loss`` each net's mean
    data loss over the rows of the last epoch (``[M]``, float64; NaN for a diverged net).
    The tensors are the trainer's own (references, as ``Trainer.state_dict()``): :meth:`clone`
    to keep a snapshot; ``to_dict`` holds tensors and ints only (``torch.save`` friendly).
    """

    model: dict[str, Tensor]
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor
    epochs_done: int
    train_loss: Tensor | None = None
    history: list[Tensor] = field(default_factory=list)

    def clone(self) -> StackedTrainingState:
        return StackedTrainingState(
            model={name: tensor.detach().clone() for name, tensor in self.model.items()},
            exp_avg=self.exp_avg.clone(),
            exp_avg_sq=self.exp_avg_sq.clone(),
            steps=self.steps.clone(),
            epochs_done=self.epochs_done,
            train_loss=None if self.train_loss is None else self.train_loss.clone(),
            history=[loss.clone() for loss in self.history],
        )

    def to_dict(self) -> dict[str, Any]:
        state = self.clone()
        return {
            "model": state.model, "exp_avg": state.exp_avg, "exp_avg_sq": state.exp_avg_sq,
            "steps": state.steps, "epochs_done": state.epochs_done, "train_loss": state.train_loss,
            "history": state.history,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackedTrainingState:
        return cls(**data).clone()


OnEpoch = Callable[[StackedTrainingState], None]


class _StackedTrainer:
    """Buffers and the hand-written training step of :func:`train_stacked` (see its docstring)."""

    def __init__(
        self,
        model: StackedMLP,
        x: ArrayLike,
        y: ArrayLike,
        train_index: Sequence[ArrayLike],
        configs: Sequence[NetConfig],
        batch_size: int,
        state: StackedTrainingState | None,
    ) -> None:
        n_nets = model.n_nets
        if len(configs) != n_nets or len(train_index) != n_nets:
            raise ValueError(
                f"the stack has {n_nets} nets: got {len(configs)} configs and {len(train_index)} index arrays"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.heteroscedastic = _common_heteroscedastic(configs)
        self.classification = model.task == "classification"
        if self.classification:
            if self.heteroscedastic:
                raise ValueError("heteroscedastic configs need a regression stack, the model is a classifier")
        elif model.n_outputs != (2 if self.heteroscedastic else 1) or model.heteroscedastic != self.heteroscedastic:
            raise ValueError(
                f"a {'heteroscedastic' if self.heteroscedastic else 'regression'} stack needs "
                f"{2 if self.heteroscedastic else 1} outputs, the model has {model.n_outputs}"
            )
        for name, attribute in (("dropout", "dropout_rate"), ("input_dropout", "input_dropout_rate")):
            wanted = torch.tensor([getattr(c, name) for c in configs], dtype=torch.float64)
            if not torch.equal(wanted, getattr(model, attribute).cpu()):
                raise ValueError(f"the configs' {name} rates differ from the model's {attribute}")

        self.model = model
        self.configs = list(configs)
        self.device = device = model.weights[0].device
        self.batch_size = batch = int(batch_size)
        self.x = torch.as_tensor(x).to(device=device, dtype=torch.float32)
        target = torch.as_tensor(y)
        if self.classification and (target.dtype.is_floating_point or target.dtype.is_complex
                                    or target.dtype == torch.bool):
            raise ValueError(f"a classifier's targets must be integer class indices, got {target.dtype}")
        self.y = target.to(device=device, dtype=torch.int64 if self.classification else torch.float32)
        if self.y.ndim == 2 and self.y.shape[1] == 1:
            self.y = self.y[:, 0]
        if self.x.ndim != 2 or self.x.shape[1] != model.n_inputs or self.y.shape != (len(self.x),):
            raise ValueError(
                f"x must be [N, {model.n_inputs}] and y [N] or [N, 1], "
                f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )
        rows = [torch.as_tensor(np.asarray(index), dtype=torch.int64).reshape(-1) for index in train_index]
        self.lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if (self.lengths == 0).any():
            raise ValueError("every net needs at least one training row")
        for r in rows:
            if int(r.min()) < 0 or int(r.max()) >= len(self.x):
                raise ValueError("train_index holds a row index outside x")
        if self.classification:
            used = self.y[torch.cat(rows).to(device)]
            if int(used.min()) < 0 or int(used.max()) >= model.n_outputs:
                raise ValueError(f"class indices must be in [0, {model.n_outputs}) for a stack of {model.n_outputs} classes")

        # Row layout of an epoch: net i's shuffled rows fill slots [0, n_i) of [S * B], the rest
        # is padding (row 0, weight 0). Step s takes slots [s B, (s + 1) B).
        self.n_steps = int(max(math.ceil(n / batch) for n in self.lengths))
        slots = self.n_steps * batch
        self.index_table = torch.zeros((n_nets, int(self.lengths.max())), dtype=torch.int64)
        for i, r in enumerate(rows):
            self.index_table[i, : len(r)] = r
        self.index_table = self.index_table.to(device)
        self.permutation = torch.zeros((n_nets, slots), dtype=torch.int64)
        counts = np.clip(self.lengths[None, :] - np.arange(self.n_steps)[:, None] * batch, 0, batch)  # [S, M]
        self.active = counts > 0
        self.all_active = self.active.all(axis=1)
        real = (torch.arange(batch)[None, None, :] < torch.as_tensor(counts)[:, :, None]).to(torch.float32)
        self.real_rows = real.to(device)  # [S, M, B]
        self.row_weights = (real / torch.as_tensor(np.maximum(counts, 1), dtype=torch.float32)[:, :, None]).to(device)
        self.active_mask = torch.as_tensor(self.active).to(device).unsqueeze(-1)  # [S, M, 1]

        # Flat per-net parameter vector [M, P] with views per layer, and its gradient.
        self.parameters = list(model.parameters())
        self.flat = torch.cat([p.detach().reshape(n_nets, -1) for p in self.parameters], dim=1).contiguous()
        self.gradient = torch.zeros_like(self.flat)
        self.flat_views: list[Tensor] = []
        self.gradient_views: list[Tensor] = []
        offset = 0
        for p in self.parameters:
            size = p[0].numel()
            self.flat_views.append(self.flat[:, offset : offset + size].view(p.shape))
            self.gradient_views.append(self.gradient[:, offset : offset + size].view(p.shape))
            offset += size
        n_layers = len(model.weights)
        # ParameterList order: weights of all layers, then biases.
        self.weight_views, self.bias_views = self.flat_views[:n_layers], self.flat_views[n_layers:]
        self.weight_gradients, self.bias_gradients = self.gradient_views[:n_layers], self.gradient_views[n_layers:]

        weight_entry = torch.zeros(self.flat.shape[1], dtype=torch.bool)
        offset = 0
        for k, p in enumerate(self.parameters):
            size = p[0].numel()
            weight_entry[offset : offset + size] = k < n_layers
            offset += size
        weight_entry = weight_entry.to(device)

        def per_entry(values: list[float]) -> Tensor | None:
            if not any(values):
                return None
            column = torch.tensor(values, dtype=torch.float32, device=device)[:, None]
            return (column * weight_entry[None, :]).contiguous()

        self.decay = per_entry([c.weight_decay for c in configs])
        self.l1 = per_entry([c.l1 for c in configs])
        self.learning_rate = np.array([c.learning_rate for c in configs], dtype=np.float64)

        if state is None:
            self.exp_avg = torch.zeros_like(self.flat)
            self.exp_avg_sq = torch.zeros_like(self.flat)
            self.steps = np.zeros(n_nets, dtype=np.int64)
            self.epochs_done = 0
            self.history: list[Tensor] = []
            self.train_loss: Tensor | None = None
        else:
            if state.exp_avg.shape != self.flat.shape or state.steps.shape != (n_nets,):
                raise ValueError("the state does not belong to a stack of this shape")
            self.exp_avg = state.exp_avg.to(device=device, dtype=torch.float32).clone()
            self.exp_avg_sq = state.exp_avg_sq.to(device=device, dtype=torch.float32).clone()
            self.steps = state.steps.cpu().numpy().astype(np.int64).copy()
            self.epochs_done = int(state.epochs_done)
            self.history = [loss.clone() for loss in state.history]
            self.train_loss = None if state.train_loss is None else state.train_loss.clone()

        # Nets are processed in groups whose activations stay small (cache, allocator).
        floats_per_row = model.n_inputs + 4 * math.ceil((model.n_inputs + sum(model.hidden_layers)) / 4) \
            + 4 * sum(model.hidden_layers) + 4 * model.n_outputs
        group = max(1, min(n_nets, _GROUP_BYTES // (4 * batch * floats_per_row)))
        self.groups = [slice(start, min(start + group, n_nets)) for start in range(0, n_nets, group)]

        # Dropout: thresholds and scales per net for each site (inputs, hidden layers); the bit
        # layout of a row is [inputs | hidden 1 | ... | padding to 4 draws per uint64].
        sites = model.site_rates()
        widths = [model.n_inputs, *model.hidden_layers]
        self.site_offsets = np.concatenate([[0], np.cumsum(widths)]).tolist()
        self.site_dropout = [bool((rates > 0).any()) for rates in sites]
        self.has_dropout = any(self.site_dropout)
        self.site_scales = [_keep_scales(rates).to(device).view(-1, 1, 1) for rates in sites]
        self.words_per_row = math.ceil(self.site_offsets[-1] / 4)
        draws_per_row = 4 * self.words_per_row
        thresholds = torch.full((n_nets, 1, draws_per_row), (1 << 15) - 1, dtype=torch.int16)
        for rates, start, end in zip(sites, self.site_offsets[:-1], self.site_offsets[1:]):
            thresholds[:, 0, start:end] = _keep_thresholds(rates)[:, None]
        self.thresholds = thresholds.to(device)
        if self.has_dropout:
            step_bytes = 8 * n_nets * batch * self.words_per_row
            self.chunk_steps = max(1, min(self.n_steps, _MASK_CHUNK_BYTES // step_bytes))
            self.bits = np.empty((n_nets, self.chunk_steps * batch * self.words_per_row), dtype=np.uint64)
            self.draws = torch.from_numpy(self.bits).view(torch.int16).view(
                n_nets, self.chunk_steps * batch, draws_per_row)
            self.mask = torch.empty((group, batch, draws_per_row), dtype=torch.float32, device=device)
            self.streams = _MaskStreams([np.random.SFC64(0) for _ in range(n_nets)])
        self.shuffle_generator = torch.Generator()

    # -- per epoch ------------------------------------------------------------------------------

    def start_epoch(self, epoch: int) -> Tensor:
        """Shuffle every net's rows for ``epoch`` and seed its mask stream; returns rows ``[S, M, B]``."""
        seeds = epoch_seeds([c.seed for c in self.configs], epoch)
        for i, (seed, n) in enumerate(zip(seeds, self.lengths)):
            self.shuffle_generator.manual_seed(seed)
            torch.randperm(int(n), generator=self.shuffle_generator, out=self.permutation[i, :n])
        if self.has_dropout:
            self.streams.seed(seeds)
        rows = self.index_table.gather(1, self.permutation.to(self.device))
        return rows.view(len(seeds), self.n_steps, self.batch_size).transpose(0, 1).contiguous()

    def draw_masks(self, first_step: int) -> None:
        """Draw the mask bits of steps ``first_step .. first_step + chunk_steps - 1``."""
        start = first_step * self.batch_size
        stop = (first_step + self.chunk_steps) * self.batch_size
        rows = np.clip(self.lengths, start, stop) - start
        self.streams.fill(self.bits, (rows * self.words_per_row).tolist())

    # -- one step -------------------------------------------------------------------------------

    def step(self, step: int, rows: Tensor, loss_sum: Tensor) -> None:
        """One batch for every net: gradients group by group, then one Adam update."""
        for nets in self.groups:
            self._gradients(step, nets, rows, loss_sum)
        self.adam(step)

    def _gradients(self, step: int, nets: slice, rows: Tensor, loss_sum: Tensor) -> None:
        """Forward and hand-written backward of the nets ``nets``; gradients go to ``self.gradient``."""
        batch = self.batch_size
        activation_name = self.model.activation
        flat_rows = rows[step, nets].reshape(-1)
        n_nets = nets.stop - nets.start
        inputs = self.x.index_select(0, flat_rows).view(n_nets, batch, -1)
        targets = self.y.index_select(0, flat_rows).view(n_nets, batch)
        weight_rows = self.row_weights[step, nets]
        real_rows = self.real_rows[step, nets]
        weights = [view[nets] for view in self.weight_views]
        biases = [view[nets] for view in self.bias_views]
        weight_gradients = [view[nets] for view in self.weight_gradients]
        bias_gradients = [view[nets] for view in self.bias_gradients]
        scales = [scale[nets] for scale in self.site_scales]
        site_dropout = self.site_dropout
        offsets = self.site_offsets

        mask = None
        if self.has_dropout:
            chunk_step = step % self.chunk_steps
            draws = self.draws[nets, chunk_step * batch : (chunk_step + 1) * batch]
            mask = self.mask[:n_nets]
            torch.le(draws.to(self.device, non_blocking=True), self.thresholds[nets], out=mask)

        def site_mask(site: int) -> Tensor:
            assert mask is not None
            return mask[:, :, offsets[site] : offsets[site + 1]]

        # Forward. Dropout multiplies by a 0/1 mask; its 1/keep scale is folded into the next
        # weight matrix (a small tensor), so hidden[k] is the masked, unscaled activation.
        if site_dropout[0]:
            inputs.mul_(site_mask(0))
        hidden = [inputs]
        scaled = [w * scales[k] if site_dropout[k] else w for k, w in enumerate(weights)]
        pre_activations: list[Tensor] = []
        last = len(weights) - 1
        relu = activation_name == "relu"
        for k in range(last):
            z = torch.baddbmm(biases[k], hidden[k], scaled[k])
            if relu:
                activation = z.clamp_min_(0.0)
                if site_dropout[k + 1]:
                    activation.mul_(site_mask(k + 1))
            else:
                pre_activations.append(z)
                activation = _activation(activation_name, z)
                if site_dropout[k + 1]:
                    activation = activation * site_mask(k + 1)
            hidden.append(activation)
        # Output transposed, [M, out, B]: a matrix-vector product is much faster this way round.
        output = torch.baddbmm(biases[last].transpose(1, 2), scaled[last].transpose(1, 2),
                               hidden[last].transpose(1, 2))

        # Loss (mean over each net's real rows of the batch) and its gradient wrt the output.
        if self.classification:
            # Cross-entropy of the logits [M, C, B]; its gradient is softmax - one_hot(target).
            log_probabilities = torch.log_softmax(output, dim=1)
            picked = targets.unsqueeze(1)
            row_loss = -log_probabilities.gather(1, picked)[:, 0]
            output_gradient = log_probabilities.exp_()
            output_gradient.scatter_add_(1, picked, torch.full_like(picked, -1.0, dtype=output_gradient.dtype))
            output_gradient.mul_(weight_rows.unsqueeze(1))
        elif self.heteroscedastic:
            residual = output[:, 0] - targets
            log_variance = output[:, 1]
            precision = torch.exp(-log_variance)
            scaled_square = residual.square() * precision
            row_loss = 0.5 * (log_variance + scaled_square)  # the Trainer's loss (no log 2 pi term)
            output_gradient = torch.stack(
                (weight_rows * residual * precision, 0.5 * weight_rows * (1.0 - scaled_square)), dim=1
            )
        else:
            residual = output[:, 0] - targets
            row_loss = residual.square()
            output_gradient = (2.0 * weight_rows * residual).unsqueeze(1)
        loss_sum[nets].add_((row_loss * real_rows).sum(dim=1))

        # Backward. (bmm straight into the strided views of the flat gradient is several times
        # slower than bmm and a copy.)
        gradient = output_gradient  # [M, out, B]
        self._store(weight_gradients[last].transpose(1, 2), torch.bmm(gradient, hidden[last]), scales, last)
        torch.sum(gradient, dim=2, keepdim=True, out=bias_gradients[last].transpose(1, 2))
        if gradient.shape[1] == 1:
            hidden_gradient = gradient.transpose(1, 2) * scaled[last].transpose(1, 2)
        else:
            hidden_gradient = torch.bmm(gradient.transpose(1, 2), scaled[last].transpose(1, 2))
        for k in range(last - 1, -1, -1):
            if relu:
                # hidden[k + 1] = relu(z) * mask is > 0 exactly where the gradient passes.
                gradient = torch.ops.aten.threshold_backward(hidden_gradient, hidden[k + 1], 0.0)
            else:
                if site_dropout[k + 1]:
                    hidden_gradient = hidden_gradient * site_mask(k + 1)
                z = pre_activations[k]
                if activation_name == "tanh":
                    gradient = torch.ops.aten.tanh_backward(hidden_gradient, torch.tanh(z))
                else:
                    gradient = torch.ops.aten.gelu_backward(hidden_gradient, z)
            self._store(weight_gradients[k], torch.bmm(hidden[k].transpose(1, 2), gradient), scales, k)
            torch.sum(gradient, dim=1, keepdim=True, out=bias_gradients[k])
            if k > 0:
                hidden_gradient = torch.bmm(gradient, scaled[k].transpose(1, 2))

    def _store(self, target: Tensor, weight_gradient: Tensor, scales: list[Tensor], layer: int) -> None:
        """Write the gradient wrt the true weights: the scaled weights' gradient times the keep scale."""
        if self.site_dropout[layer]:
            torch.mul(weight_gradient, scales[layer], out=target)
        else:
            target.copy_(weight_gradient)

    @torch.no_grad()
    def adam(self, step: int) -> None:
        """Penalty gradient, then torch's Adam update (its tensor-step-size form) for the active nets."""
        gradient, flat = self.gradient, self.flat
        if self.decay is not None:
            gradient.addcmul_(flat, self.decay)
        if self.l1 is not None:
            gradient.addcmul_(flat.sign(), self.l1)
        active = self.active[step]
        partial = not self.all_active[step]
        if partial:
            previous = (flat.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone())
        self.steps[active] += 1
        beta1, beta2 = ADAM_BETAS
        steps = np.maximum(self.steps, 1).astype(np.float64)
        step_size = self.learning_rate / (1.0 - beta1**steps)
        bias_correction2_sqrt = np.sqrt(1.0 - beta2**steps)
        factors = torch.from_numpy(np.stack([-bias_correction2_sqrt * step_size, -ADAM_EPS / step_size], axis=1))
        factors = factors.to(device=self.device, dtype=torch.float32)
        self.exp_avg.lerp_(gradient, 1.0 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
        # param + step_size * m / (sqrt(v) / bc2_sqrt + eps), with the negative step size folded
        # into the denominator (torch's capturable Adam).
        denominator = self.exp_avg_sq.sqrt().div_(factors[:, 0:1]).add_(factors[:, 1:2])
        flat.addcdiv_(self.exp_avg, denominator)
        if partial:
            keep = self.active_mask[step]
            for tensor, old in zip((flat, self.exp_avg, self.exp_avg_sq), previous):
                tensor.copy_(torch.where(keep, tensor, old))

    # -- state ----------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_model(self) -> None:
        for parameter, view in zip(self.parameters, self.flat_views):
            parameter.copy_(view)

    def state(self) -> StackedTrainingState:
        return StackedTrainingState(
            model=self.model.state_dict(),
            exp_avg=self.exp_avg,
            exp_avg_sq=self.exp_avg_sq,
            steps=torch.from_numpy(self.steps.copy()),
            epochs_done=self.epochs_done,
            train_loss=self.train_loss,
            history=self.history,
        )


def train_stacked(
    model: StackedMLP,
    x: ArrayLike,
    y: ArrayLike,
    train_index: Sequence[ArrayLike],
    configs: Sequence[NetConfig],
    *,
    epochs: int,
    batch_size: int,
    on_epoch: OnEpoch | None = None,
    should_stop: Callable[[], bool] | None = None,
    state: StackedTrainingState | None = None,
) -> StackedTrainingState:
    """Train the M nets of ``model`` together up to ``epochs`` (from ``state`` if given).

    ``x [N, D]`` (standardised inputs) and ``y [N]`` (standardised target, or integer class
    indices in ``[0, n_outputs)`` for a classification stack) are shared; net i
    trains on rows ``train_index[i]`` (lengths may differ) with ``configs[i]``, whose dropout
    rates must be the model's (build it with :meth:`StackedMLP.from_configs`). Each epoch every
    net shuffles its own rows and walks them in batches of ``batch_size``; a net with fewer
    batches sits out the extra steps (no Adam step, its own step count stays behind). The
    epoch's ``train_loss`` (``[M]``) is each net's mean data loss over its rows with dropout on.

    ``on_epoch(state)`` is called after every epoch with the live state (``state.clone()`` to
    checkpoint); ``should_stop`` is polled before every epoch and batch and a True answer raises
    :class:`~service.ml.training.TrainingCancelled`. The model's parameters are updated at the
    end of every epoch. Passing a state from an earlier call (e.g. a checkpoint) loads it into
    ``model`` and resumes bit-identically to an uninterrupted run.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if state is not None:
        model.load_state_dict(state.model)
    trainer = _StackedTrainer(model, x, y, train_index, configs, batch_size, state)
    lengths = torch.as_tensor(trainer.lengths, dtype=torch.float64, device=trainer.device)
    while trainer.epochs_done < epochs:
        if should_stop is not None and should_stop():
            raise TrainingCancelled(trainer.epochs_done, mid_epoch=False)
        epoch = trainer.epochs_done + 1
        rows = trainer.start_epoch(epoch)
        loss_sum = torch.zeros(model.n_nets, dtype=torch.float32, device=trainer.device)
        epoch_loss = torch.zeros(model.n_nets, dtype=torch.float64, device=trainer.device)
        for step in range(trainer.n_steps):
            if should_stop is not None and should_stop():
                trainer.sync_model()
                raise TrainingCancelled(trainer.epochs_done, mid_epoch=True)
            if trainer.has_dropout and step % trainer.chunk_steps == 0:
                trainer.draw_masks(step)
            trainer.step(step, rows, loss_sum)
            if (step + 1) % 64 == 0:  # keep the float32 running sum short
                epoch_loss += loss_sum
                loss_sum.zero_()
        epoch_loss += loss_sum
        trainer.train_loss = epoch_loss / lengths
        trainer.history.append(trainer.train_loss)
        trainer.epochs_done = epoch
        trainer.sync_model()
        if on_epoch is not None:
            on_epoch(trainer.state())
    trainer.sync_model()
    return trainer.state()


# ---------------------------------------------------------------------------------------------
# Prediction


def deterministic_stacked(model: StackedMLP, x: ArrayLike) -> Tensor:
    """Outputs ``[M, B, out]`` with dropout off (the weight-scaling rule of inverted dropout)."""
    with torch.inference_mode():
        return model.outputs(x, dropout=False)


def predict_stacked(
    model: StackedMLP,
    x: ArrayLike,
    samples: int,
    seed: int | None = None,
    *,
    chunk: int | None = None,
) -> Tensor:
    """``samples`` (T) MC-dropout outputs of every net: ``[M, T, B, out]`` for ``x [M, B, D]`` or shared ``[B, D]``.

    Each net, sample and row has its own masks, drawn as in training (16-bit draws from a
    private SFC64 stream per net, seeded from ``seed`` and the net's position; fresh OS entropy
    without a seed), so concurrent calls are safe and a seed reproduces the samples. Nets and
    samples are processed in groups of at most ``chunk`` samples (default: so that no
    activation exceeds 2**22 elements); a net's draws are consumed in order, so the result does
    not depend on ``chunk``. The part before the first dropout (the first layer, when no net
    has input dropout) is computed once.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    with torch.inference_mode():
        inputs = model.batched_inputs(x)
        n_nets, rows = inputs.shape[0], inputs.shape[1]
        device = inputs.device
        sites = model.site_rates()
        site_dropout = [bool((rates > 0).any()) for rates in sites]
        if not any(site_dropout):
            deterministic = deterministic_stacked(model, inputs)
            return deterministic.unsqueeze(1).expand(n_nets, samples, rows, model.n_outputs).clone()

        widths = [model.n_inputs, *model.hidden_layers]
        offsets = np.concatenate([[0], np.cumsum(widths)]).tolist()
        words_per_row = math.ceil(offsets[-1] / 4)
        draws_per_row = 4 * words_per_row
        per_sample = rows * max(draws_per_row, *widths, model.n_outputs)
        group = max(1, min(n_nets, _PREDICT_MAX_ELEMENTS // per_sample))
        if chunk is None:
            chunk = _PREDICT_MAX_ELEMENTS // (group * per_sample)
        chunk = max(1, min(int(chunk), samples))
        thresholds = torch.full((n_nets, 1, draws_per_row), (1 << 15) - 1, dtype=torch.int16)
        for rates, start, end in zip(sites, offsets[:-1], offsets[1:]):
            thresholds[:, 0, start:end] = _keep_thresholds(rates)[:, None]
        thresholds = thresholds.to(device)
        scales = [_keep_scales(rates).to(device).view(-1, 1, 1) for rates in sites]
        weights = [w * s if drop else w for w, s, drop in zip(model.weights, scales, site_dropout)]
        biases = list(model.biases)
        generators = [np.random.SFC64(child) for child in np.random.SeedSequence(seed).spawn(n_nets)]

        last = len(weights) - 1
        first_layer = 0
        prefix = inputs
        if not site_dropout[0]:  # the first layer sees the same inputs in every sample
            prefix = _activation(model.activation, torch.baddbmm(biases[0], inputs, weights[0]))
            first_layer = 1
        output = torch.empty((n_nets, samples, rows, model.n_outputs), dtype=torch.float32, device=device)
        bits = np.empty((group, chunk * rows * words_per_row), dtype=np.uint64)
        mask_buffer = torch.empty((group, chunk * rows, draws_per_row), dtype=torch.float32, device=device)
        for first_net in range(0, n_nets, group):
            nets = slice(first_net, min(first_net + group, n_nets))
            size = nets.stop - nets.start
            streams = _MaskStreams(generators[nets])
            for start in range(0, samples, chunk):
                t = min(chunk, samples - start)
                streams.fill(bits, [t * rows * words_per_row] * size)
                draws = torch.from_numpy(bits).view(torch.int16).view(group, chunk * rows, draws_per_row)
                mask = mask_buffer[:size, : t * rows]
                torch.le(draws[:size, : t * rows].to(device), thresholds[nets], out=mask)

                def site_mask(site: int, mask: Tensor = mask) -> Tensor:
                    return mask[:, :, offsets[site] : offsets[site + 1]]

                # [size, t, rows, width]: one multiply broadcasts the prefix and applies the mask.
                base = prefix[nets].unsqueeze(1)
                if site_dropout[first_layer]:
                    hidden = (base * site_mask(first_layer).view(size, t, rows, -1)).view(size, t * rows, -1)
                else:
                    hidden = base.expand(size, t, rows, base.shape[-1]).reshape(size, t * rows, -1)
                for k in range(first_layer, last):
                    hidden = torch.baddbmm(biases[k][nets], hidden, weights[k][nets])
                    if model.activation == "relu":
                        hidden = hidden.clamp_min_(0.0)
                    else:
                        hidden = _activation(model.activation, hidden)
                    if site_dropout[k + 1]:
                        hidden.mul_(site_mask(k + 1))
                # Output transposed ([size, out, t * rows]): matrix-vector products are faster this way.
                result = torch.baddbmm(biases[last][nets].transpose(1, 2), weights[last][nets].transpose(1, 2),
                                       hidden.transpose(1, 2))
                output[nets, start : start + t] = result.transpose(1, 2).view(size, t, rows, -1) \
                    if model.n_outputs == 1 else result.transpose(1, 2).reshape(size, t, rows, -1)
        return output


# ---------------------------------------------------------------------------------------------
# Regression evaluation


def _as_targets(y: ArrayLike, n_nets: int, rows: int) -> Tensor:
    target = torch.as_tensor(y).to(torch.float64)
    if target.ndim in (2, 3) and target.shape[-1] == 1 and target.shape[-2] == rows:
        target = target[..., 0]
    if target.ndim == 1:
        target = target.unsqueeze(0).expand(n_nets, rows)
    if target.shape != (n_nets, rows):
        raise ValueError(f"targets must have shape [B] or [M, B] = [{n_nets}, {rows}], got {tuple(target.shape)}")
    return target


def _squeeze_output(samples: Tensor, name: str) -> Tensor:
    if samples.ndim == 4 and samples.shape[-1] == 1:
        samples = samples[..., 0]
    if samples.ndim != 3:
        raise ValueError(f"{name} must have shape [M, T, B] or [M, T, B, 1], got {tuple(samples.shape)}")
    return samples


def heteroscedastic_log_likelihood_mc(y: ArrayLike, means: Tensor, variances: Tensor) -> Tensor:
    """Per-net, per-point log-likelihood ``log (1/T) sum_t N(y; mean_t, variance_t)``: ``[M, B]`` float64.

    ``means`` are ``[M, T, B]`` (or ``[M, T, B, 1]``) and ``variances`` broadcast to them, in the
    units of ``y`` (``[B]`` shared or ``[M, B]``); for a heteroscedastic stack's samples
    ``[M, T, B, 2]``, ``mc.heteroscedastic_to_original_units`` gives the means and log-variances.
    """
    means = _squeeze_output(torch.as_tensor(means), "means").to(torch.float64)
    variances = torch.as_tensor(variances, dtype=torch.float64, device=means.device)
    if variances.ndim == 4 and variances.shape[-1] == 1:
        variances = variances[..., 0]
    variances = torch.broadcast_to(variances, means.shape)
    n_nets, n_samples, rows = means.shape
    target = _as_targets(y, n_nets, rows).to(means.device)
    result = torch.empty((n_nets, rows), dtype=torch.float64, device=means.device)
    for i in range(n_nets):  # one net at a time bounds the float64 temporaries
        exponent = -0.5 * (target[i] - means[i]).square() / variances[i] - 0.5 * torch.log(variances[i])
        result[i] = torch.logsumexp(exponent, dim=0)
    return result - math.log(n_samples) - 0.5 * _LOG_2PI


def gaussian_log_likelihood_mc(y: ArrayLike, samples: Tensor, tau: float | Sequence[float] | Tensor) -> Tensor:
    """MC dropout test log-likelihood per net and point (Gal & Ghahramani 2016, eq. 8): ``[M, B]`` float64.

    ``logsumexp_t(-tau/2 (y - yhat_t)^2) - log T - log(2 pi)/2 + log(tau)/2`` for samples
    ``[M, T, B]`` (or ``[M, T, B, 1]``) and targets ``[B]`` or ``[M, B]`` in the same (original)
    units; ``tau`` is one precision or one per net.
    """
    samples = _squeeze_output(torch.as_tensor(samples), "samples").to(torch.float64)
    n_nets, n_samples, rows = samples.shape
    tau = torch.as_tensor(tau, dtype=torch.float64, device=samples.device).reshape(-1)
    if tau.numel() == 1:
        tau = tau.expand(n_nets)
    if tau.shape != (n_nets,) or not bool((tau > 0).all()):
        raise ValueError(f"tau must be one positive precision or one per net ({n_nets})")
    target = _as_targets(y, n_nets, rows).to(samples.device)
    result = torch.empty((n_nets, rows), dtype=torch.float64, device=samples.device)
    for i in range(n_nets):
        exponent = -0.5 * tau[i] * (target[i] - samples[i]).square()
        result[i] = torch.logsumexp(exponent, dim=0)
    return result - math.log(n_samples) - 0.5 * _LOG_2PI + 0.5 * torch.log(tau)[:, None]
