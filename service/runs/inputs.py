"""Inline feature rows from a request body, checked once for every path that takes them
(predict, acquisition pools): row widths against the model, values within float32."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInput


def feature_matrix(rows: Sequence[Sequence[float]], n_features: int, *, noun: str = "input") -> np.ndarray:
    """``rows`` as a float32 ``[N, n_features]`` array; InvalidInput (422 at body.inputs[i])
    for rows of another width (the first 20 listed) or values float32 cannot hold."""
    wrong = [
        {"loc": ["body", "inputs", i], "msg": f"{len(values)} features, the model takes {n_features}", "type": "wrong_length"}
        for i, values in enumerate(rows) if len(values) != n_features
    ]
    if wrong:
        raise InvalidInput(f"every {noun} needs {n_features} features", errors=wrong[:20])
    with np.errstate(over="ignore"):
        features = np.asarray(rows, dtype=np.float64).astype(np.float32)
    if not np.isfinite(features).all():
        raise InvalidInput(
            "inputs overflow float32",
            errors=[{"loc": ["body", "inputs"], "msg": "values beyond ±3.4e38", "type": "value_error"}],
        )
    return features
