"""End-of-epoch training checkpoints: weights, optimiser state, RNG states, epoch.

Written with ``torch.save`` and read with ``torch.load(weights_only=True)``: tensors, numbers
and containers only — loading never executes code.
"""

from __future__ import annotations

import io
from typing import Any

import torch


def serialize(trainer_state: dict[str, Any]) -> bytes:
    state = {
        **trainer_state,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def deserialize(blob: bytes, device: str | torch.device = "cpu") -> dict[str, Any]:
    state = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    rng = state.pop("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return state
