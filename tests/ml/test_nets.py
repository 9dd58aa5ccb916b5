import json

import pytest
import torch
from torch import nn

from service.ml.nets import NetworkSpec, build_network, seeded_rng

SPEC = NetworkSpec(n_inputs=4, n_outputs=3, hidden_layers=(8, 6), dropout=(0.5, 0.0), input_dropout=0.2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dropout": (0.5,)}, "one rate per hidden layer"),
        ({"dropout": (0.5, 1.0)}, r"dropout\[1\]"),
        ({"dropout": (-0.1, 0.0)}, r"dropout\[0\]"),
        ({"dropout": (float("nan"), 0.0)}, r"dropout\[0\]"),
        ({"input_dropout": 1.0}, "input_dropout"),
        ({"hidden_layers": (8, 0)}, r"hidden_layers\[1\]"),
        ({"n_inputs": 0}, "n_inputs"),
        ({"n_outputs": 0}, "n_outputs"),
        ({"activation": "sigmoid"}, "activation"),
    ],
)
def test_spec_validation(fields, message):
    data = SPEC.to_dict() | fields
    with pytest.raises(ValueError, match=message):
        NetworkSpec(**data)


def test_spec_dict_round_trip_is_json_able():
    data = json.loads(json.dumps(SPEC.to_dict()))
    assert data["hidden_layers"] == [8, 6]
    assert NetworkSpec.from_dict(data) == SPEC
    assert NetworkSpec(4, 3, [8, 6], [0.5, 0]) == NetworkSpec(4, 3, (8, 6), (0.5, 0.0))


def test_layout_and_dtype():
    net = build_network(SPEC)
    assert not any(module.training for module in net.modules())  # ready for inference
    kinds = [type(m) for m in net]
    assert kinds == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    assert [m.p for m in net if isinstance(m, nn.Dropout)] == [0.2, 0.5]
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert net(torch.zeros(5, 4)).shape == (5, 3)
    linear = build_network(NetworkSpec(2, 1, (), (), activation="tanh"))
    assert [type(m) for m in linear] == [nn.Linear]


def test_state_dict_round_trip():
    source = build_network(SPEC, seed=1)
    target = build_network(NetworkSpec.from_dict(SPEC.to_dict()), seed=2)
    target.load_state_dict(source.state_dict())
    x = torch.randn(7, 4)
    source.eval(), target.eval()
    assert torch.equal(source(x), target(x))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = build_network(SPEC, seed=3), build_network(SPEC, seed=3), build_network(SPEC, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name])
    assert not torch.equal(a[1].weight, c[1].weight)


def test_seeded_rng_restores_state():
    state = torch.get_rng_state()
    with seeded_rng(5):
        first = torch.rand(3)
    with seeded_rng(5):
        assert torch.equal(torch.rand(3), first)
    assert torch.equal(torch.get_rng_state(), state)
