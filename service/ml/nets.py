"""Dropout networks: a JSON-able architecture spec and the ``nn.Sequential`` built from it.

The module list depends on the spec alone, so weights saved from one network load into
``build_network(spec)`` of any later process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

Activation = Literal["relu", "tanh", "gelu"]
Task = Literal["classification", "regression"]

ACTIVATIONS: tuple[str, ...] = get_args(Activation)
TASKS: tuple[str, ...] = get_args(Task)

_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _check_rate(name: str, rate: float) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and 0.0 <= rate < 1.0):
        raise ValueError(f"{name} must be a dropout rate in [0, 1), got {rate!r}")


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a fully connected dropout network.

    ``dropout[i]`` is the dropout rate applied after hidden layer ``i`` (its activation);
    ``input_dropout`` is applied to the inputs. Lists are accepted and stored as tuples.

    ``heteroscedastic`` marks a regression net with a Gaussian head (Kendall & Gal 2017):
    output 0 is the mean and output 1 the log-variance of the (standardised) target, so
    ``n_outputs`` must be 2 — it is not added implicitly, so that ``n_outputs`` always is the
    width of the last layer and of its stored weights.
    """

    n_inputs: int
    n_outputs: int
    hidden_layers: tuple[int, ...]
    dropout: tuple[float, ...]
    input_dropout: float = 0.0
    activation: Activation = "relu"
    heteroscedastic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))
        object.__setattr__(self, "dropout", tuple(float(p) for p in self.dropout))
        for name in ("n_inputs", "n_outputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for i, width in enumerate(self.hidden_layers):
            if not isinstance(width, int) or isinstance(width, bool) or width < 1:
                raise ValueError(f"hidden_layers[{i}] must be an integer >= 1, got {width!r}")
        if len(self.dropout) != len(self.hidden_layers):
            raise ValueError(
                f"dropout needs one rate per hidden layer: got {len(self.dropout)} rates "
                f"for {len(self.hidden_layers)} hidden layers"
            )
        for i, rate in enumerate(self.dropout):
            _check_rate(f"dropout[{i}]", rate)
        _check_rate("input_dropout", self.input_dropout)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.heteroscedastic, bool):
            raise ValueError(f"heteroscedastic must be a bool, got {self.heteroscedastic!r}")
        if self.heteroscedastic and self.n_outputs != 2:
            raise ValueError(
                f"a heteroscedastic net needs n_outputs=2 (mean, log-variance), got {self.n_outputs}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        return {
            "n_inputs": self.n_inputs,
            "n_outputs": self.n_outputs,
            "hidden_layers": list(self.hidden_layers),
            "dropout": list(self.dropout),
            "input_dropout": self.input_dropout,
            "activation": self.activation,
            "heteroscedastic": self.heteroscedastic,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ``TypeError``.

        Dicts stored before ``heteroscedastic`` existed lack it and load as homoscedastic.
        """
        return cls(**data)


def build_network(spec: NetworkSpec, seed: int | None = None) -> nn.Sequential:
    """Build the float32 network ``[Dropout] (Linear, activation, [Dropout])* Linear``.

    Dropout modules are added only for rates > 0. With ``seed`` the initial weights are
    reproducible and the caller's global RNG state is left untouched. The network is returned
    in eval mode, ready for inference (and for concurrent MC sampling, which then changes no
    module flags); the trainer switches modes itself.
    """

    def layers() -> list[nn.Module]:
        modules: list[nn.Module] = []
        if spec.input_dropout > 0:
            modules.append(nn.Dropout(spec.input_dropout))
        width = spec.n_inputs
        for hidden, rate in zip(spec.hidden_layers, spec.dropout):
            modules += [nn.Linear(width, hidden), _ACTIVATION_MODULES[spec.activation]()]
            if rate > 0:
                modules.append(nn.Dropout(rate))
            width = hidden
        modules.append(nn.Linear(width, spec.n_outputs))
        return modules

    with seeded_rng(seed, "cpu") if seed is not None else contextlib.nullcontext():
        net = nn.Sequential(*layers())
    return net.to(torch.float32).eval()


@contextlib.contextmanager
def seeded_rng(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Seed torch's global RNG of the CPU (and of ``device`` if it is a GPU) for the block.

    The previous RNG states are restored on exit, so the caller's random streams are not
    disturbed; other GPUs are neither touched nor forked.
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
