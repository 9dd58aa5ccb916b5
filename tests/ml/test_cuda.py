"""The ML layer on a CUDA device: training, checkpoints across devices, MC dropout's statistics
and seeds, the sweep engine. Skipped where torch sees no CUDA device (CI here has none); run on a
GPU machine with ``pytest tests/ml/test_cuda.py tests/test_gpu_end_to_end.py``.

On CUDA the MC engine takes its general path (masks from a CUDA ``torch.Generator``), so its
samples differ from the CPU's for the same seed but must follow the same distribution; the
comparisons below are statistical, with the tolerances of tests/ml/test_mc.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from service.ml.data import Standardizer, load_builtin, split_indices
from service.ml.mc import (
    deterministic_outputs,
    sample_outputs,
    sample_outputs_and_deterministic,
    sample_outputs_loop,
    summarize_classification,
)
from service.ml.nets import NetworkSpec, build_network
from service.ml.sweep import StackedMLP, predict_stacked, train_stacked
from service.ml.training import Trainer, TrainingConfig, fit
from tests.ml.test_mc import assert_same_distribution
from tests.ml.test_sweep import TRAIN, VAL, X, Y, config, trainer_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
SPEC = NetworkSpec(n_inputs=64, n_outputs=10, hidden_layers=(64, 64), dropout=(0.5, 0.5), input_dropout=0.2)


def digits():
    dataset = load_builtin("digits")
    train, val = split_indices(dataset.n_rows, 0.2, seed=0)
    x = Standardizer.fit(dataset.features[train]).transform(dataset.features)
    return x[train], dataset.target[train], x[val], dataset.target[val]


DIGITS = digits()


def trained_on(device: torch.device | str, epochs: int = 8, seed: int = 5) -> Trainer:
    trainer = Trainer(build_network(SPEC, seed=0), "classification", *DIGITS,
                      TrainingConfig(epochs=epochs, batch_size=32, learning_rate=3e-3, seed=seed), device=device)
    fit(trainer)
    return trainer


@pytest.fixture(scope="module")
def cuda_trainer() -> Trainer:
    return trained_on(CUDA)


def test_training_on_cuda_learns_and_a_seed_reproduces_it(cuda_trainer):
    assert all(p.device.type == "cuda" for p in cuda_trainer.net.parameters())
    again = trained_on(CUDA)
    for name, tensor in cuda_trainer.net.state_dict().items():
        assert torch.equal(tensor, again.net.state_dict()[name]), name
    other = trained_on(CUDA, seed=6)
    assert not torch.equal(other.net[1].weight, cuda_trainer.net[1].weight)
    x_val, y_val = DIGITS[2], DIGITS[3]
    logits = deterministic_outputs(cuda_trainer.net, x_val)
    assert logits.device.type == "cuda"
    assert (logits.argmax(1).cpu().numpy() == y_val).mean() > 0.9


def test_a_cuda_checkpoint_loads_on_the_cpu_safely_and_resumes_there(cuda_trainer):
    buffer = io.BytesIO()
    torch.save(cuda_trainer.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    cpu = Trainer(build_network(SPEC, seed=99), "classification", *DIGITS,
                  TrainingConfig(epochs=10, batch_size=32, learning_rate=3e-3, seed=5))
    cpu.load_state_dict(state)
    assert cpu.epochs_done == 8 and all(p.device.type == "cpu" for p in cpu.net.parameters())
    x = DIGITS[2]
    torch.testing.assert_close(deterministic_outputs(cpu.net, x), deterministic_outputs(cuda_trainer.net, x).cpu(),
                               rtol=1e-4, atol=1e-4)
    rest = fit(cpu)  # the optimizer's state came across too: training goes on from epoch 9
    assert [m.epoch for m in rest] == [9, 10] and rest[-1].val_accuracy > 0.9


def test_mc_sampling_on_cuda_follows_the_cpu_distribution_and_seeds_reproduce(cuda_trainer):
    net = cuda_trainer.net
    x = torch.as_tensor(DIGITS[2][:16])
    samples = sample_outputs(net, x, 400, seed=3)
    assert samples.device.type == "cuda" and samples.shape == (400, 16, 10)
    assert torch.equal(samples, sample_outputs(net, x, 400, seed=3))
    assert not torch.equal(samples, sample_outputs(net, x, 400, seed=4))
    assert not torch.equal(samples[0], samples[1]) and (samples.std(0) > 0).all()
    cpu_net = build_network(SPEC)
    cpu_net.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    assert_same_distribution(samples.cpu(), sample_outputs(cpu_net, x, 400, seed=3))  # fused CPU path
    assert_same_distribution(samples.cpu(), sample_outputs_loop(cpu_net, x, 400, seed=3))  # nn.Dropout forwards
    # Chunked over samples on the GPU: the same distribution again.
    assert_same_distribution(samples.cpu(), sample_outputs(net, x, 400, seed=9, max_elements=16 * 64 * 7).cpu())
    both, dropout_off = sample_outputs_and_deterministic(net, x, 400, seed=3)
    assert torch.equal(both, samples)
    torch.testing.assert_close(dropout_off, deterministic_outputs(net, x))


def test_mc_summaries_on_cuda_keep_their_invariants_and_uncertainty_rises_off_the_data(cuda_trainer):
    net = cuda_trainer.net
    rows = torch.as_tensor(DIGITS[2][:200])
    summary = summarize_classification(sample_outputs(net, rows, 200, seed=0))
    probabilities = torch.as_tensor(np.asarray(summary.probabilities))
    torch.testing.assert_close(probabilities.sum(-1).double(), torch.ones(200, dtype=torch.float64), atol=1e-5, rtol=0)
    entropy, information = (torch.as_tensor(np.asarray(v)) for v in (summary.predictive_entropy, summary.mutual_information))
    assert (entropy >= information - 1e-6).all() and (information >= -1e-6).all()
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    for far_away in (rows + 10.0, 3.0 * noise):
        far = summarize_classification(sample_outputs(net, far_away, 200, seed=0)).mutual_information
        assert np.asarray(far).mean() > 2 * np.asarray(summary.mutual_information).mean()


def test_a_net_without_dropout_gives_its_deterministic_output_on_cuda():
    net = build_network(NetworkSpec(5, 3, (16,), (0.0,)), seed=0).to(CUDA)
    x = torch.randn(4, 5)
    samples = sample_outputs(net, x, 5, seed=0)
    for sample in samples:
        torch.testing.assert_close(sample, net.eval()(x.to(CUDA)))


def test_sweep_engine_on_cuda_reproduces_the_trainer_without_dropout_and_predicts_reproducibly():
    configs = [config(seed, dropout=0.0, input_dropout=0.0) for seed in (0, 1)]
    model = StackedMLP.from_configs(10, (16,), configs).to(CUDA)
    x, y = torch.as_tensor(X, device=CUDA), torch.as_tensor(Y, device=CUDA)
    state = train_stacked(model, x, y, [TRAIN] * 2, configs, epochs=2, batch_size=32)
    for i, cfg in enumerate(configs):
        trainer = trainer_for(cfg, hidden=(16,), epochs=2)  # the Trainer on the CPU
        history = fit(trainer)
        assert [float(loss[i]) for loss in state.history] == pytest.approx([m.train_loss for m in history], rel=1e-4)
        for stacked, alone in zip(model.to_network(i).state_dict().values(), trainer.net.state_dict().values()):
            torch.testing.assert_close(stacked.cpu(), alone, rtol=1e-3, atol=1e-4)
    dropout_model = StackedMLP(10, (12,), 1, seeds=[0, 1], dropout_rate=[0.1, 0.3], input_dropout_rate=0.1).to(CUDA)
    first = predict_stacked(dropout_model, x[VAL[:7]], samples=50, seed=5)
    assert first.device.type == "cuda" and first.shape == (2, 50, 7, 1)
    assert torch.equal(first, predict_stacked(dropout_model, x[VAL[:7]], samples=50, seed=5))
    assert not torch.equal(first[:, 0], first[:, 1])
    cpu_model = StackedMLP(10, (12,), 1, seeds=[0, 1], dropout_rate=[0.1, 0.3], input_dropout_rate=0.1)
    torch.testing.assert_close(  # the sweep's masks are counter-based: the same on both devices
        first.cpu(), predict_stacked(cpu_model, torch.as_tensor(X[VAL[:7]]), samples=50, seed=5), rtol=1e-4, atol=1e-4)

