import numpy as np
import pytest

from service.ml.data import BUILTIN_DATASETS, Standardizer, load_builtin, split_indices


@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_load_builtin(name):
    dataset = load_builtin(name)
    assert dataset.features.dtype == np.float32 and dataset.features.ndim == 2
    assert dataset.target.shape == (dataset.n_rows,)
    assert len(dataset.feature_names) == dataset.n_features
    if name == "diabetes":
        assert dataset.task == "regression" and dataset.target.dtype == np.float32
        assert dataset.n_classes is None and dataset.class_names is None
    else:
        assert dataset.task == "classification" and dataset.target.dtype == np.int64
        assert set(np.unique(dataset.target)) == set(range(dataset.n_classes))


def test_load_builtin_unknown():
    with pytest.raises(ValueError, match="unknown builtin dataset"):
        load_builtin("mnist")


def test_standardizer_columns_and_constant_column():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], dtype=np.float32)
    scaler = Standardizer.fit(x)
    z = scaler.transform(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-7)
    np.testing.assert_allclose(z[:, 0].std(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(scaler.std, [np.sqrt(8 / 3), 1.0])
    np.testing.assert_allclose(scaler.inverse_transform(z), x, rtol=1e-6)
    restored = Standardizer.from_dict(scaler.to_dict())
    np.testing.assert_array_equal(restored.transform(x), z)


def test_standardizer_on_a_target():
    y = np.array([10.0, 20.0, 30.0])
    scaler = Standardizer.fit(y)
    assert scaler.mean.shape == scaler.std.shape == (1,)
    z = scaler.transform(y)
    assert z.shape == (3,)
    np.testing.assert_allclose(scaler.inverse_transform(z), y)


def test_split_indices():
    train, val = split_indices(100, 0.2, seed=7)
    assert len(val) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, val])) == list(range(100))
    again = split_indices(100, 0.2, seed=7)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(split_indices(100, 0.2, seed=8)[1], val)
    train, val = split_indices(10, 0.0, seed=0)
    assert len(val) == 0 and list(train) == list(range(10))
    assert len(split_indices(3, 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError):
        split_indices(10, 1.0, seed=0)
