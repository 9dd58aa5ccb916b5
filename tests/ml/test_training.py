import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from service.ml.data import Standardizer, load_builtin, split_indices
from service.ml.mc import deterministic_outputs
from service.ml.metrics import rmse
from service.ml.nets import NetworkSpec, build_network
from service.ml.training import (
    NonFiniteLossError,
    Trainer,
    TrainingCancelled,
    TrainingConfig,
    fit,
)


def iris_split():
    dataset = load_builtin("iris")
    train, val = split_indices(dataset.n_rows, 0.2, seed=0)
    scaler = Standardizer.fit(dataset.features[train])
    x = scaler.transform(dataset.features)
    return x[train], dataset.target[train], x[val], dataset.target[val]


IRIS = iris_split()
SPEC = NetworkSpec(n_inputs=4, n_outputs=3, hidden_layers=(16, 16), dropout=(0.2, 0.2), input_dropout=0.1)


def make_trainer(config: TrainingConfig, data=IRIS, spec=SPEC, net_seed=0) -> Trainer:
    return Trainer(build_network(spec, seed=net_seed), "classification", *data, config)


def assert_same_tensors(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_loss_decreases_and_classifier_learns():
    history = fit(make_trainer(TrainingConfig(epochs=15, batch_size=16, learning_rate=1e-2)))
    assert [m.epoch for m in history] == list(range(1, 16))
    assert history[-1].train_loss < 0.5 * history[0].train_loss
    assert history[-1].val_loss < history[0].val_loss
    assert history[-1].val_accuracy >= 0.85
    assert history[-1].train_rmse is None and history[-1].val_rmse is None
    assert set(history[-1].to_dict()) >= {"epoch", "train_loss", "val_accuracy", "duration_s"}


def test_same_seed_gives_bit_identical_weights_and_different_seed_does_not():
    config = TrainingConfig(epochs=3, batch_size=16, learning_rate=1e-2, seed=5)
    runs = [make_trainer(config) for _ in range(2)]
    histories = [fit(trainer) for trainer in runs]
    assert_same_tensors(runs[0].net.state_dict(), runs[1].net.state_dict())
    assert [m.train_loss for m in histories[0]] == [m.train_loss for m in histories[1]]
    other = make_trainer(TrainingConfig(epochs=3, batch_size=16, learning_rate=1e-2, seed=6))
    fit(other)
    assert not torch.equal(other.net[1].weight, runs[0].net[1].weight)


def test_training_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    fit(make_trainer(TrainingConfig(epochs=1)))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_from_checkpoint_is_bit_identical(optimizer):
    config = TrainingConfig(
        epochs=5, batch_size=16, optimizer=optimizer, learning_rate=1e-2, weight_decay=1e-3, seed=3
    )
    uninterrupted = make_trainer(config)
    expected = fit(uninterrupted)

    first = make_trainer(config)
    checkpoints = []
    with pytest.raises(TrainingCancelled) as cancelled:
        fit(
            first,
            on_epoch=lambda metrics: checkpoints.append(_saved(first)),
            should_stop=lambda: len(checkpoints) == 3,
        )
    assert cancelled.value.epochs_done == 3 and not cancelled.value.mid_epoch

    resumed = make_trainer(config, net_seed=99)  # fresh weights, overwritten by the checkpoint
    resumed.load_state_dict(torch.load(io.BytesIO(checkpoints[-1])))
    assert resumed.epochs_done == 3
    rest = fit(resumed)
    assert [m.epoch for m in rest] == [4, 5]
    assert [m.train_loss for m in rest] == [m.train_loss for m in expected[3:]]
    assert_same_tensors(resumed.net.state_dict(), uninterrupted.net.state_dict())


def test_a_checkpoint_of_the_unfused_optimizer_resumes_with_it_bit_identically():
    """Checkpoints written before the Trainer used torch's fused optimizer kernels (or by a build
    without them) carry their implementation, so a resumed run ends as the uninterrupted one."""
    config = TrainingConfig(epochs=4, batch_size=16, learning_rate=1e-2, seed=3)

    def unfused(trainer: Trainer) -> Trainer:
        trainer.optimizer = torch.optim.Adam(trainer.net.parameters(), lr=config.learning_rate)
        return trainer

    assert make_trainer(config).optimizer.param_groups[0]["fused"] is True
    uninterrupted = unfused(make_trainer(config))
    fit(uninterrupted)
    first = unfused(make_trainer(config))
    checkpoints = []
    with pytest.raises(TrainingCancelled):
        fit(first, on_epoch=lambda metrics: checkpoints.append(_saved(first)), should_stop=lambda: len(checkpoints) == 2)
    resumed = make_trainer(config, net_seed=99)
    resumed.load_state_dict(torch.load(io.BytesIO(checkpoints[-1]), weights_only=True))
    assert not resumed.optimizer.param_groups[0]["fused"]
    fit(resumed)
    assert_same_tensors(resumed.net.state_dict(), uninterrupted.net.state_dict())


def _saved(trainer: Trainer) -> bytes:
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    return buffer.getvalue()


def test_cancel_between_batches():
    calls = iter(range(100))
    trainer = make_trainer(TrainingConfig(epochs=2, batch_size=16))
    with pytest.raises(TrainingCancelled) as cancelled:
        trainer.run_epoch(should_stop=lambda: next(calls) == 2)
    assert cancelled.value.mid_epoch and trainer.epochs_done == 0


def weight_norms(net: nn.Module) -> tuple[float, float]:
    weights = [m.weight.detach() for m in net.modules() if isinstance(m, nn.Linear)]
    return sum(float(w.square().sum()) for w in weights), sum(float(w.abs().sum()) for w in weights)


def test_weight_decay_and_l1_shrink_the_weights_but_not_the_biases():
    base = dict(epochs=10, batch_size=16, optimizer="sgd", learning_rate=5e-2)
    plain, decayed, sparse = (
        make_trainer(TrainingConfig(**base, **extra)) for extra in ({}, {"weight_decay": 0.05}, {"l1": 0.01})
    )
    for trainer in (plain, decayed, sparse):
        fit(trainer)
    assert weight_norms(decayed.net)[0] < 0.8 * weight_norms(plain.net)[0]
    assert weight_norms(sparse.net)[1] < 0.8 * weight_norms(plain.net)[1]

    # One step from identical weights: the penalty gradient is weight_decay * W on weights only.
    config = TrainingConfig(epochs=1, optimizer="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.5)
    trainer = make_trainer(config)
    trainer.x_train = torch.zeros(4, 4)  # zero inputs => zero data gradient for the first layer's weights
    trainer.y_train = torch.zeros(4, dtype=torch.int64)
    before = copy.deepcopy(trainer.net)
    trainer.run_epoch()
    first_layer = trainer.net[1]
    assert torch.allclose(first_layer.weight, before[1].weight * (1 - 0.1 * 0.5))
    # the bias moves only by the data gradient, which penalties do not change
    unpenalised = make_trainer(TrainingConfig(epochs=1, optimizer="sgd", momentum=0.0, learning_rate=0.1))
    unpenalised.x_train, unpenalised.y_train = trainer.x_train, trainer.y_train
    unpenalised.run_epoch()
    assert torch.allclose(first_layer.bias, unpenalised.net[1].bias)


def test_non_finite_loss_raises():
    x_train, y_train, x_val, y_val = IRIS
    broken = x_train.copy()
    broken[:] = np.inf
    with pytest.raises(NonFiniteLossError) as error:
        make_trainer(TrainingConfig(epochs=1), data=(broken, y_train, x_val, y_val)).run_epoch()
    assert (error.value.epoch, error.value.batch) == (1, 1)

    exploding = make_trainer(TrainingConfig(epochs=5, optimizer="sgd", learning_rate=1e30))
    with pytest.raises(NonFiniteLossError):
        fit(exploding)


def test_regression_rmse_is_in_original_units():
    dataset = load_builtin("diabetes")
    train, val = split_indices(dataset.n_rows, 0.25, seed=0)
    x_scaler = Standardizer.fit(dataset.features[train])
    y_scaler = Standardizer.fit(dataset.target[train])
    x = x_scaler.transform(dataset.features)
    y = y_scaler.transform(dataset.target)
    spec = NetworkSpec(n_inputs=dataset.n_features, n_outputs=1, hidden_layers=(32,), dropout=(0.1,))
    net = build_network(spec, seed=0)
    trainer = Trainer(
        net, "regression", x[train], y[train], x[val], y[val],
        TrainingConfig(epochs=5, learning_rate=1e-2), target_scale=float(y_scaler.std[0]),
    )
    history = fit(trainer)
    last = history[-1]
    assert last.train_accuracy is None and last.val_accuracy is None
    assert last.train_rmse == pytest.approx(math.sqrt(last.train_loss) * y_scaler.std[0])
    predictions = y_scaler.inverse_transform(deterministic_outputs(net, x[val]).numpy()[:, 0])
    assert last.val_rmse == pytest.approx(rmse(predictions, dataset.target[val]), rel=1e-4)
    assert last.val_rmse < np.std(dataset.target[val])  # better than predicting the mean
    assert 30 < last.val_rmse < 80  # diabetes is in the 25..346 range; a standardised RMSE would be < 1


def test_no_validation_rows():
    x_train, y_train, _, _ = IRIS
    empty = np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64)
    for x_val, y_val in [(None, None), empty]:
        metrics = make_trainer(TrainingConfig(epochs=1), data=(x_train, y_train, x_val, y_val)).run_epoch()
        assert metrics.val_loss is None and metrics.val_accuracy is None
        assert metrics.train_accuracy is not None


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainingConfig(epochs=1, optimizer="rmsprop")
    config = TrainingConfig(epochs=2, l1=0.1)
    assert TrainingConfig.from_dict(config.to_dict()) == config


def test_targets_as_column_and_modes_after_an_epoch():
    x_train, y_train, x_val, y_val = IRIS
    trainer = make_trainer(TrainingConfig(epochs=1), data=(x_train, y_train[:, None], x_val, y_val[:, None]))
    assert trainer.y_train.shape == (len(y_train),)
    trainer.run_epoch()
    assert not any(module.training for module in trainer.net.modules())
    with pytest.raises(ValueError, match="same"):
        make_trainer(TrainingConfig(epochs=1), data=(x_train, y_train[:-1], x_val, y_val))
