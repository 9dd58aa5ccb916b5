"""service.runs.service.Predicted.json: the served predict body is PredictResponse's own JSON, byte
for byte, for rows as TrainedModel.predict builds them (classification, homoscedastic and
heteroscedastic regression), and for values JSON has no number for."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest

from service.ml.data import Standardizer
from service.ml.nets import NetworkSpec, build_network
from service.runs.modelling import TrainedModel
from service.runs.service import Predicted

FEATURES = 6
ROWS = np.random.default_rng(0).normal(size=(40, FEATURES)).astype(np.float32)


def model(task: str, **network: object) -> TrainedModel:
    outputs = 3 if task == "classification" else 2 if network.get("heteroscedastic") else 1
    spec = NetworkSpec(n_inputs=FEATURES, n_outputs=outputs, hidden_layers=(16,), dropout=(0.3,), **network)
    regression = task == "regression"
    return TrainedModel(
        task=task, network=spec, net=build_network(spec, seed=0).eval(), input_scaler=Standardizer.fit(ROWS),
        target_scaler=Standardizer.fit(ROWS[:, :1]) if regression else None,
        tau=(None if spec.heteroscedastic else 4.0) if regression else None,
        class_names=["a", "b", "c"] if not regression else None,
    )


MODELS = {
    "classification": model("classification"),
    "regression": model("regression"),
    "heteroscedastic regression": model("regression", heteroscedastic=True),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", [None, 3])
def test_the_body_is_the_response_models_json(name: str, seed: int | None) -> None:
    trained = MODELS[name]
    rows = trained.predict(ROWS[:5], 20, seed)
    predicted = Predicted(uuid.uuid4(), trained.task, 20, seed, trained.class_names, rows)
    assert predicted.json() == predicted.response().model_dump_json().encode()


def test_values_json_cannot_hold_are_null_as_in_the_model() -> None:
    trained = MODELS["regression"]
    rows = trained.predict(ROWS[:2], 5, 0)
    rows[0]["std"], rows[1]["mean"] = math.nan, math.inf
    predicted = Predicted(uuid.uuid4(), trained.task, 5, 0, None, rows)
    assert predicted.json() == predicted.response().model_dump_json().encode()
    body = json.loads(predicted.json())  # valid JSON
    assert body["predictions"][0]["std"] is None and body["predictions"][1]["mean"] is None
