"""Inline feature rows from a request body, checked once for every path that takes them
(predict, acquisition pools): row widths against the model, values within float32."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.errors import InvalidInput

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def feature_matrix(rows: Sequence[Sequence[float]], n_features: int, *, noun: str = "input") -> np.ndarray:
    """``rows`` as a float32 ``[N, n_features]`` array; InvalidInput (422 at body.inputs[i])
    for rows of another width (the first 20 listed) or values float32 cannot hold."""
    wrong = [
        {"loc": ["body", "inputs", i], "msg": f"{len(values)} features, the model takes {n_features}", "type": "wrong_length"}
        for i, values in enumerate(rows) if len(values) != n_features
    ]
    if wrong:
        raise InvalidInput(f"every {noun} needs {n_features} features", errors=wrong[:20])
    # Range-checked in float64 before the cast, so that the cast cannot overflow: half the CPU of
    # a cast under np.errstate and an isfinite pass (a served request's rows come through here).
    values = np.asarray(rows, dtype=np.float64)
    if values.size and not (-_FLOAT32_MAX <= values.min() and values.max() <= _FLOAT32_MAX):  # NaN fails both
        raise InvalidInput(
            "inputs overflow float32",
            errors=[{"loc": ["body", "inputs"], "msg": "values beyond ±3.4e38", "type": "value_error"}],
        )
    return values.astype(np.float32)
