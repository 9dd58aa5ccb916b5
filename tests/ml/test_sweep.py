import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from service.ml.data import Standardizer, load_builtin, split_indices
from service.ml.mc import heteroscedastic_to_original_units
from service.ml.metrics import gaussian_mixture_log_likelihood
from service.ml.nets import NetworkSpec, build_network
from service.ml.sweep import (
    NetConfig,
    StackedMLP,
    StackedTrainingState,
    deterministic_stacked,
    epoch_seeds,
    gaussian_log_likelihood_mc,
    heteroscedastic_log_likelihood_mc,
    predict_stacked,
    train_stacked,
    weight_decay_from_prior,
)
from service.ml.training import Trainer, TrainingCancelled, TrainingConfig, epoch_seed, fit


def diabetes():
    """Standardised diabetes regression set: x [442, 10], y [442], train and validation rows."""
    dataset = load_builtin("diabetes")
    train, val = split_indices(dataset.n_rows, 0.2, seed=0)
    x = Standardizer.fit(dataset.features[train]).transform(dataset.features)
    y = Standardizer.fit(dataset.target[train]).transform(dataset.target).reshape(-1)
    return x, y.astype(np.float32), train, val


X, Y, TRAIN, VAL = diabetes()


def config(seed, **overrides):
    values = dict(dropout=0.1, input_dropout=0.05, weight_decay=1e-3, learning_rate=1e-2, seed=seed)
    values.update(overrides)
    return NetConfig(**values)


def trainer_for(cfg, hidden=(16,), activation="relu", epochs=1, batch_size=32, rows=TRAIN):
    spec = NetworkSpec(10, 1, hidden, (cfg.dropout,) * len(hidden), cfg.input_dropout, activation)
    training = TrainingConfig(epochs=epochs, batch_size=batch_size, learning_rate=cfg.learning_rate,
                              weight_decay=cfg.weight_decay, l1=cfg.l1, seed=cfg.seed)
    return Trainer(build_network(spec, seed=cfg.seed), "regression", X[rows], Y[rows], X[VAL], Y[VAL], training)


def test_initial_weights_are_those_of_build_network():
    seeds = [0, 7, 123]
    model = StackedMLP(10, (6, 5), 2, seeds=seeds, activation="tanh")
    for i, seed in enumerate(seeds):
        spec = NetworkSpec(10, 2, (6, 5), (0.3, 0.0), input_dropout=0.2, activation="tanh")
        linears = [m for m in build_network(spec, seed=seed) if isinstance(m, nn.Linear)]
        for k, linear in enumerate(linears):
            assert torch.equal(model.weights[k][i], linear.weight.t())
            assert torch.equal(model.biases[k][i, 0], linear.bias)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_stacked_forward_equals_per_net_forward(activation):
    model = StackedMLP(10, (8, 6), 3, seeds=[1, 2, 3, 4], dropout_rate=0.5, input_dropout_rate=0.2,
                       activation=activation)
    shared = torch.as_tensor(X[:20])
    per_net = torch.as_tensor(X[:80]).view(4, 20, 10)
    for inputs in (shared, per_net):
        stacked = deterministic_stacked(model, inputs)
        assert stacked.shape == (4, 20, 3)
        for i in range(4):
            net = model.to_network(i)
            assert net.training is False
            net_inputs = inputs if inputs.ndim == 2 else inputs[i]
            torch.testing.assert_close(stacked[i], net(net_inputs), rtol=1e-5, atol=1e-6)
    # Without dropout the MC samples are the deterministic outputs.
    model.dropout_rate.zero_()
    model.input_dropout_rate.zero_()
    samples = predict_stacked(model, shared, samples=3, seed=0)
    torch.testing.assert_close(samples, deterministic_stacked(model, shared).unsqueeze(1).expand_as(samples))


def counting_model(rates, input_rates, units=256):
    """Net i outputs (scaled) the number of units kept by both dropout layers: x = 1,
    identity first layer, summing output layer."""
    model = StackedMLP(units, (units,), 1, seeds=range(len(rates)), dropout_rate=rates,
                       input_dropout_rate=input_rates)
    with torch.no_grad():
        model.weights[0].copy_(torch.eye(units))
        model.weights[1].fill_(1.0)
        for bias in model.biases:
            bias.zero_()
    return model


@pytest.mark.parametrize("site", ["hidden", "input", "both"])
def test_every_net_and_sample_has_its_own_masks_at_its_rate(site):
    rates = torch.tensor([0.0, 0.1, 0.1, 0.5], dtype=torch.float64)
    hidden = rates if site in ("hidden", "both") else torch.zeros(4, dtype=torch.float64)
    inputs = rates.flip(0) * 0.6 if site in ("input", "both") else torch.zeros(4, dtype=torch.float64)
    model = counting_model(hidden, inputs)
    keep = (1 - hidden) * (1 - inputs)
    scale = 1.0 / ((1 - hidden) * (1 - inputs))
    with torch.no_grad():
        draws = {
            "mc": predict_stacked(model, torch.ones(4, 256), samples=100, seed=3)[..., 0],  # [M, T, B]
            "train-mode forward": torch.stack([model.train()(torch.ones(4, 256), torch.Generator().manual_seed(t))
                                               for t in range(100)], dim=1)[..., 0],
        }
    model.eval()
    for name, outputs in draws.items():
        kept = torch.round(outputs / scale[:, None, None].to(torch.float32))  # kept units per row
        fraction = kept.reshape(4, -1).mean(dim=1) / 256
        n_units = kept[0].numel() * 256
        for i in range(4):
            tolerance = 5 * math.sqrt(keep[i] * (1 - keep[i]) / n_units) + 1e-4
            assert abs(float(fraction[i]) - float(keep[i])) < tolerance, (name, i)
            if keep[i] < 1:
                assert len(torch.unique(kept[i])) > 10, name  # rows and samples differ
        # Nets with equal rates draw different masks.
        if hidden[1] == hidden[2] and inputs[1] == inputs[2] and keep[1] < 1:
            assert not torch.equal(kept[1], kept[2]), name


def test_predict_stacked_is_reproducible_and_does_not_depend_on_chunking():
    model = StackedMLP(10, (12,), 2, seeds=[0, 1, 2], dropout_rate=[0.1, 0.2, 0.3], input_dropout_rate=0.1)
    x = torch.as_tensor(X[:7])
    first = predict_stacked(model, x, samples=10, seed=5)
    assert first.shape == (3, 10, 7, 2)
    # The same masks whatever the chunk; the matmuls' rounding may depend on their shape (MKL picks
    # its kernels by shape on AVX-512 CPUs), so equal up to float32 round-off — a different mask
    # would move an output by ~0.1.
    same = dict(rtol=0.0, atol=1e-6)
    torch.testing.assert_close(predict_stacked(model, x, samples=10, seed=5, chunk=3), first, **same)
    torch.testing.assert_close(predict_stacked(model, x.expand(3, 7, 10), samples=10, seed=5, chunk=1), first, **same)
    assert not torch.equal(first, predict_stacked(model, x, samples=10, seed=6))
    assert not torch.equal(first[:, 0], first[:, 1])


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_without_dropout_stacked_training_reproduces_the_trainer(activation):
    # Same initial weights and the same data order as the Trainer: only float rounding differs.
    configs = [config(seed, dropout=0.0, input_dropout=0.0, l1=1e-4) for seed in (0, 1, 2)]
    model = StackedMLP.from_configs(10, (16, 8), configs, activation=activation)
    state = train_stacked(model, X, Y, [TRAIN] * 3, configs, epochs=2, batch_size=32)
    for i, cfg in enumerate(configs):
        trainer = trainer_for(cfg, hidden=(16, 8), activation=activation, epochs=2)
        history = fit(trainer)
        stacked_losses = [float(loss[i]) for loss in state.history]
        assert stacked_losses == pytest.approx([m.train_loss for m in history], rel=1e-5)
        for stacked, alone in zip(model.to_network(i).state_dict().values(), trainer.net.state_dict().values()):
            torch.testing.assert_close(stacked, alone, rtol=1e-4, atol=1e-5)
    assert state.steps.tolist() == [2 * math.ceil(len(TRAIN) / 32)] * 3


def test_heteroscedastic_training_without_dropout_reproduces_the_trainer():
    configs = [config(seed, dropout=0.0, input_dropout=0.0, heteroscedastic=True) for seed in (0, 1)]
    model = StackedMLP.from_configs(10, (16,), configs)
    state = train_stacked(model, X, Y, [TRAIN] * 2, configs, epochs=2, batch_size=32)
    for i, cfg in enumerate(configs):
        spec = NetworkSpec(10, 2, (16,), (0.0,), heteroscedastic=True)
        training = TrainingConfig(epochs=2, batch_size=32, learning_rate=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, seed=cfg.seed)
        trainer = Trainer(build_network(spec, seed=cfg.seed), "regression", X[TRAIN], Y[TRAIN], None, None,
                          training, heteroscedastic=True)
        history = fit(trainer)
        assert [float(loss[i]) for loss in state.history] == pytest.approx([m.train_loss for m in history], rel=1e-5)
        for stacked, alone in zip(model.to_network(i).state_dict().values(), trainer.net.state_dict().values()):
            torch.testing.assert_close(stacked, alone, rtol=1e-4, atol=1e-5)


def test_stacked_training_with_dropout_matches_the_trainer_statistically():
    seeds = list(range(8))
    configs = [config(seed, dropout=0.1, input_dropout=0.1) for seed in seeds]
    model = StackedMLP.from_configs(10, (32,), configs)
    state = train_stacked(model, X, Y, [TRAIN] * 8, configs, epochs=30, batch_size=64)
    stacked_val = ((deterministic_stacked(model, X[VAL])[..., 0] - torch.as_tensor(Y[VAL])) ** 2).mean(dim=1)
    alone_val, alone_first = [], []
    for cfg in configs:
        history = fit(trainer_for(cfg, hidden=(32,), epochs=30, batch_size=64))
        alone_val.append(history[-1].val_loss)
        alone_first.append(history[0].train_loss)
    stacked_val, alone_val = stacked_val.double().numpy(), np.array(alone_val)
    standard_error = math.sqrt(stacked_val.var(ddof=1) / 8 + alone_val.var(ddof=1) / 8)
    assert abs(stacked_val.mean() - alone_val.mean()) < 3 * standard_error
    assert stacked_val.mean() < 0.8  # it learned something (the target has variance 1)
    # Same initial weights and data order: the first epoch differs only by the dropout masks,
    # far less than it differs between seeds.
    difference = np.abs(state.history[0].numpy() - np.array(alone_first))
    assert difference.max() < 0.1
    assert difference.mean() < 0.5 * np.std(alone_first)


def test_changing_one_net_leaves_the_others_bit_identical():
    base = [config(seed, l1=1e-4) for seed in (3, 4, 5, 6)]
    changed = list(base)
    changed[2] = config(5, learning_rate=3e-2, weight_decay=1e-1, dropout=0.3, input_dropout=0.0, l1=0.0)
    results = []
    for configs in (base, changed):
        model = StackedMLP.from_configs(10, (16,), configs)
        rows = [TRAIN, TRAIN[:200], TRAIN, TRAIN[50:]]
        state = train_stacked(model, X, Y, rows, configs, epochs=3, batch_size=32)
        results.append((model, state))
    (first, first_state), (second, second_state) = results
    for i in (0, 1, 3):
        for a, b in zip(first.parameters(), second.parameters()):
            assert torch.equal(a[i], b[i])
        assert torch.equal(first_state.exp_avg_sq[i], second_state.exp_avg_sq[i])
        assert [float(loss[i]) for loss in first_state.history] == [float(loss[i]) for loss in second_state.history]
    assert not torch.equal(first.weights[0][2], second.weights[0][2])


def test_resume_from_a_checkpoint_is_bit_identical():
    configs = [config(seed) for seed in (0, 1, 2)]
    rows = [TRAIN, TRAIN[:100], TRAIN[:37]]
    uninterrupted = StackedMLP.from_configs(10, (16,), configs)
    expected = train_stacked(uninterrupted, X, Y, rows, configs, epochs=4, batch_size=64)

    checkpoints = {}
    first = StackedMLP.from_configs(10, (16,), configs)

    def keep(state: StackedTrainingState) -> None:
        buffer = io.BytesIO()
        torch.save(state.to_dict(), buffer)
        checkpoints[state.epochs_done] = buffer.getvalue()

    train_stacked(first, X, Y, rows, configs, epochs=2, batch_size=64, on_epoch=keep)
    assert sorted(checkpoints) == [1, 2]
    checkpoint = StackedTrainingState.from_dict(torch.load(io.BytesIO(checkpoints[2]), weights_only=True))
    resumed_model = StackedMLP.from_configs(10, (16,), configs)  # fresh weights, replaced by the checkpoint's
    resumed = train_stacked(resumed_model, X, Y, rows, configs, epochs=4, batch_size=64, state=checkpoint)

    assert resumed.epochs_done == expected.epochs_done == 4
    for a, b in zip(uninterrupted.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(expected.exp_avg, resumed.exp_avg)
    assert torch.equal(expected.exp_avg_sq, resumed.exp_avg_sq)
    assert torch.equal(expected.steps, resumed.steps)
    assert all(torch.equal(a, b) for a, b in zip(expected.history, resumed.history))


def test_unequal_train_lengths():
    configs = [config(seed) for seed in (0, 1, 2)]
    rows = [TRAIN[:40], TRAIN[:100], TRAIN]
    model = StackedMLP.from_configs(10, (16,), configs)
    seen = []
    global_rng = torch.get_rng_state()
    state = train_stacked(model, X, Y, rows, configs, epochs=3, batch_size=64,
                          on_epoch=lambda s: seen.append(s.train_loss.clone()))
    assert torch.equal(torch.get_rng_state(), global_rng)  # private generators only
    assert len(seen) == 3 and all(bool(torch.isfinite(loss).all()) for loss in seen)
    assert state.steps.tolist() == [3 * math.ceil(len(r) / 64) for r in rows]
    # Each net trains as it would alone (a stack of one).
    for i, cfg in enumerate(configs):
        alone = StackedMLP.from_configs(10, (16,), [cfg])
        alone_state = train_stacked(alone, X, Y, [rows[i]], [cfg], epochs=3, batch_size=64)
        torch.testing.assert_close(alone.weights[0][0], model.weights[0][i], rtol=1e-5, atol=1e-6)
        assert float(alone_state.train_loss[0]) == pytest.approx(float(state.train_loss[i]), rel=1e-5)


def test_should_stop_cancels_between_epochs_and_batches():
    configs = [config(0)]
    model = StackedMLP.from_configs(10, (8,), configs)
    with pytest.raises(TrainingCancelled) as cancelled:
        train_stacked(model, X, Y, [TRAIN], configs, epochs=5, batch_size=32, should_stop=lambda: True)
    assert cancelled.value.epochs_done == 0 and not cancelled.value.mid_epoch
    polls = iter(range(100))
    with pytest.raises(TrainingCancelled) as cancelled:
        train_stacked(model, X, Y, [TRAIN], configs, epochs=5, batch_size=32, should_stop=lambda: next(polls) == 20)
    assert cancelled.value.epochs_done == 1 and cancelled.value.mid_epoch


def test_heteroscedastic_nets_learn_larger_variance_where_the_noise_is_larger():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(800, 1, generator=generator) * 2 - 1
    noise_std = torch.where(x[:, 0] < 0, 0.1, 0.8)
    y = torch.sin(2 * x[:, 0]) + noise_std * torch.randn(800, generator=generator)
    configs = [NetConfig(dropout=0.05, input_dropout=0.0, weight_decay=1e-4, learning_rate=1e-2, seed=s,
                         heteroscedastic=True) for s in (0, 1)]
    model = StackedMLP.from_configs(1, (32,), configs)
    assert model.n_outputs == 2 and model.network_spec(0).heteroscedastic
    train_stacked(model, x, y, [np.arange(800)] * 2, configs, epochs=60, batch_size=64)
    probe = torch.tensor([[-0.5], [0.5]])
    means, log_variances = heteroscedastic_to_original_units(predict_stacked(model, probe, samples=50, seed=0))
    variances = log_variances.exp()
    variance = variances.mean(dim=1)  # [M, 2]
    assert bool((variance[:, 1] > 8 * variance[:, 0]).all())  # true ratio 64
    assert bool((variance[:, 1].sqrt() - 0.8).abs().lt(0.3).all())
    log_likelihood = heteroscedastic_log_likelihood_mc(torch.sin(2 * probe[:, 0]), means, variances)
    assert log_likelihood.shape == (2, 2) and bool(torch.isfinite(log_likelihood).all())
    assert bool((log_likelihood[:, 0] > log_likelihood[:, 1]).all())


def test_log_likelihood_helpers_match_the_metric():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(3, 50, 7, 1, generator=generator) * 2 + 10
    y = torch.randn(3, 7, generator=generator) + 10
    tau = [0.5, 1.0, 4.0]
    result = gaussian_log_likelihood_mc(y, samples, tau)
    assert result.shape == (3, 7) and result.dtype == torch.float64
    for i in range(3):
        expected = gaussian_mixture_log_likelihood(y[i].numpy(), samples[i].numpy(), tau[i])
        np.testing.assert_allclose(result[i].numpy(), expected, rtol=1e-6, atol=1e-8)
    variances = (1.0 / torch.tensor(tau, dtype=torch.float64)).view(3, 1, 1)
    torch.testing.assert_close(heteroscedastic_log_likelihood_mc(y, samples, variances), result)
    shared = gaussian_log_likelihood_mc(y[0], samples, 2.0)
    torch.testing.assert_close(shared[0], gaussian_log_likelihood_mc(y[:1], samples[:1], 2.0)[0])


def test_configs_and_helpers():
    assert weight_decay_from_prior(1e-2, 0.1, 400, 2.0) == pytest.approx(2 * 1e-4 * 0.9 / (2 * 400 * 2.0))
    with pytest.raises(ValueError):
        NetConfig(dropout=1.0, input_dropout=0.0, weight_decay=0.0, learning_rate=1e-3, seed=0)
    with pytest.raises(ValueError):
        StackedMLP.from_configs(10, (4,), [config(0), config(1, heteroscedastic=True)])
    model = StackedMLP.from_configs(10, (4,), [config(0)])
    with pytest.raises(ValueError, match="rates differ"):
        train_stacked(model, X, Y, [TRAIN], [config(0, dropout=0.3)], epochs=1, batch_size=32)
    seeds = [0, 5, 2**32 - 1, 2**40]
    assert epoch_seeds(seeds, 7) == [epoch_seed(seed, 7) for seed in seeds]


# -- classification ----------------------------------------------------------------------------


def digits():
    """Standardised digits: x [1797, 64], class indices y [1797], 600 training and 300 validation rows."""
    dataset = load_builtin("digits")
    order = np.random.default_rng(0).permutation(dataset.n_rows)
    train, val = np.sort(order[:600]), np.sort(order[600:900])
    x = Standardizer.fit(dataset.features[train]).transform(dataset.features).astype(np.float32)
    return x, dataset.target.astype(np.int64), train, val


DIGITS_X, DIGITS_Y, DIGITS_TRAIN, DIGITS_VAL = digits()


def classification_trainer(cfg, hidden=(32,), activation="relu", epochs=1, batch_size=32):
    spec = NetworkSpec(64, 10, hidden, (cfg.dropout,) * len(hidden), cfg.input_dropout, activation)
    training = TrainingConfig(epochs=epochs, batch_size=batch_size, learning_rate=cfg.learning_rate,
                              weight_decay=cfg.weight_decay, l1=cfg.l1, seed=cfg.seed)
    return Trainer(build_network(spec, seed=cfg.seed), "classification", DIGITS_X[DIGITS_TRAIN],
                   DIGITS_Y[DIGITS_TRAIN], DIGITS_X[DIGITS_VAL], DIGITS_Y[DIGITS_VAL], training)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_without_dropout_stacked_classification_reproduces_the_trainer(activation):
    # Same initial weights and data order, cross-entropy of the logits: only float rounding differs.
    configs = [config(seed, dropout=0.0, input_dropout=0.0, l1=1e-4) for seed in (0, 1, 2)]
    model = StackedMLP.from_configs(64, (24, 12), configs, activation=activation, n_classes=10)
    assert model.task == "classification" and model.n_outputs == 10
    state = train_stacked(model, DIGITS_X, DIGITS_Y, [DIGITS_TRAIN] * 3, configs, epochs=2, batch_size=32)
    for i, cfg in enumerate(configs):
        trainer = classification_trainer(cfg, hidden=(24, 12), activation=activation, epochs=2)
        history = fit(trainer)
        assert [float(loss[i]) for loss in state.history] == pytest.approx([m.train_loss for m in history], rel=1e-5)
        # Adam turns round-off in a near-zero gradient into a step of up to the learning rate (1e-2).
        for stacked, alone in zip(model.to_network(i).state_dict().values(), trainer.net.state_dict().values()):
            torch.testing.assert_close(stacked, alone, rtol=1e-4, atol=1e-4)
    logits = deterministic_stacked(model, DIGITS_X[DIGITS_VAL])
    assert logits.shape == (3, len(DIGITS_VAL), 10)


def test_stacked_classification_with_dropout_matches_the_trainer_statistically():
    seeds = list(range(8))
    configs = [config(seed, dropout=0.3, input_dropout=0.1, weight_decay=0.0, learning_rate=3e-3) for seed in seeds]
    model = StackedMLP.from_configs(64, (32,), configs, n_classes=10)
    state = train_stacked(model, DIGITS_X, DIGITS_Y, [DIGITS_TRAIN] * 8, configs, epochs=8, batch_size=64)
    logits = deterministic_stacked(model, DIGITS_X[DIGITS_VAL]).double()
    targets = torch.as_tensor(DIGITS_Y[DIGITS_VAL])
    stacked_val = nn.functional.cross_entropy(logits.transpose(1, 2), targets.expand(8, -1), reduction="none").mean(dim=1)
    stacked_accuracy = (logits.argmax(-1) == targets).double().mean(dim=1)
    alone_val, alone_accuracy, alone_first = [], [], []
    for cfg in configs:
        history = fit(classification_trainer(cfg, epochs=8, batch_size=64))
        alone_val.append(history[-1].val_loss)
        alone_accuracy.append(history[-1].val_accuracy)
        alone_first.append(history[0].train_loss)
    stacked_val, alone_val = stacked_val.numpy(), np.array(alone_val)
    standard_error = math.sqrt(stacked_val.var(ddof=1) / 8 + alone_val.var(ddof=1) / 8)
    assert abs(stacked_val.mean() - alone_val.mean()) < 3 * standard_error
    assert abs(float(stacked_accuracy.mean()) - np.mean(alone_accuracy)) < 0.02
    assert float(stacked_accuracy.mean()) > 0.9  # it learned (chance is 0.1)
    # Same initial weights and data order: the first epoch differs only by the dropout masks.
    difference = np.abs(state.history[0].numpy() - np.array(alone_first))
    assert difference.max() < 0.1
    assert difference.mean() < 0.5 * np.std(alone_first) + 0.02


def test_classification_stacks_check_their_inputs():
    configs = [config(0), config(1)]
    model = StackedMLP.from_configs(64, (8,), configs, n_classes=10)
    with pytest.raises(ValueError, match="integer class indices"):
        train_stacked(model, DIGITS_X, DIGITS_Y.astype(np.float32), [DIGITS_TRAIN] * 2, configs, epochs=1, batch_size=32)
    with pytest.raises(ValueError, match="class indices must be in"):
        train_stacked(model, DIGITS_X, DIGITS_Y + 1, [DIGITS_TRAIN] * 2, configs, epochs=1, batch_size=32)
    with pytest.raises(ValueError, match="regression only"):
        StackedMLP.from_configs(64, (8,), [config(0, heteroscedastic=True)], n_classes=10)
    with pytest.raises(ValueError, match="n_classes"):
        StackedMLP.from_configs(64, (8,), configs, n_classes=1)


def test_a_subset_holds_copies_of_its_nets():
    configs = [config(seed, dropout=0.1 * seed, input_dropout=0.0) for seed in range(4)]
    model = StackedMLP.from_configs(64, (8,), configs, n_classes=10)
    part = model.subset(slice(1, 3))
    assert part.n_nets == 2 and part.task == "classification"
    assert part.dropout_rate.tolist() == pytest.approx([0.1, 0.2])
    inputs = torch.as_tensor(DIGITS_X[:5])
    torch.testing.assert_close(deterministic_stacked(part, inputs), deterministic_stacked(model, inputs)[1:3])
    with torch.no_grad():
        part.weights[0].zero_()
    assert bool(model.weights[0][1].abs().sum() > 0)  # copies, not views
    samples = predict_stacked(model, inputs, samples=3, seed=0)
    assert samples.shape == (4, 3, 5, 10)
    with pytest.raises(ValueError):
        model.subset(slice(2, 2))


def test_stacked_mc_classification_agrees_with_the_services_mc_sampling():
    from service.ml.mc import sample_outputs, summarize_classification

    configs = [config(0, dropout=0.5, input_dropout=0.2, weight_decay=0.0, learning_rate=3e-3)]
    model = StackedMLP.from_configs(64, (32,), configs, n_classes=10)
    train_stacked(model, DIGITS_X, DIGITS_Y, [DIGITS_TRAIN], configs, epochs=5, batch_size=64)
    inputs = torch.as_tensor(DIGITS_X[DIGITS_VAL[:100]])
    stacked = summarize_classification(predict_stacked(model, inputs, samples=400, seed=0)[0])
    alone = summarize_classification(sample_outputs(model.to_network(0), inputs, 400, 0))
    # Different masks, the same predictive distribution: only Monte Carlo error (T = 400).
    assert np.abs(stacked.probabilities - alone.probabilities).max() < 0.08
    assert np.abs(stacked.mutual_information - alone.mutual_information).mean() < 0.02
    assert (stacked.label == alone.label).mean() > 0.95
