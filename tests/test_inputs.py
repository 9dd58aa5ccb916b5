"""service.runs.inputs.feature_matrix: widths and the float32 range, without the API."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.errors import InvalidInput
from service.runs.inputs import feature_matrix

FLOAT32_MAX = float(np.finfo(np.float32).max)


def test_rows_become_float32() -> None:
    features = feature_matrix([[1, 2.5], [-FLOAT32_MAX, FLOAT32_MAX]], 2)
    assert features.dtype == np.float32 and features.shape == (2, 2)
    np.testing.assert_array_equal(features, np.array([[1, 2.5], [-FLOAT32_MAX, FLOAT32_MAX]], dtype=np.float32))


@pytest.mark.parametrize("bad", [1e39, -1e39, math.inf, -math.inf, math.nan])
def test_values_float32_cannot_hold_are_refused(bad: float) -> None:
    with pytest.raises(InvalidInput) as caught:
        feature_matrix([[0.0, 1.0], [2.0, bad]], 2)
    assert caught.value.errors == [{"loc": ["body", "inputs"], "msg": "values beyond ±3.4e38", "type": "value_error"}]


def test_wrong_widths_are_listed_by_row() -> None:
    with pytest.raises(InvalidInput) as caught:
        feature_matrix([[0.0, 1.0], [2.0], [1.0, 2.0, 3.0]], 2)
    assert [error["loc"] for error in caught.value.errors] == [["body", "inputs", 1], ["body", "inputs", 2]]


def test_no_rows() -> None:
    assert feature_matrix([], 3).size == 0
