import json
import math

import numpy as np
import pytest
import torch

from service.ml.evaluation import evaluate_classification, evaluate_regression


def as_json(result: dict) -> dict:
    return json.loads(json.dumps(result, allow_nan=False))


def test_confident_correct_predictions_are_perfect():
    labels = torch.tensor([0, 2, 1, 2])
    logits = 50.0 * torch.nn.functional.one_hot(labels, 3).to(torch.float32)
    result = as_json(evaluate_classification(logits.expand(5, -1, -1), logits, labels))
    assert (result["n"], result["samples"]) == (4, 5)
    for part in ("mc", "deterministic"):
        metrics = result[part]
        assert metrics["accuracy"] == 1.0
        assert metrics["ece"] == pytest.approx(0.0, abs=1e-12)
        assert metrics["nll"] == pytest.approx(0.0, abs=1e-12)
        assert metrics["brier"] == pytest.approx(0.0, abs=1e-12)
        assert [b["count"] for b in metrics["reliability"]] == [0] * 14 + [4]
    mc = result["mc"]
    assert mc["auroc_predictive_entropy"] is None and mc["auroc_mutual_information"] is None  # nothing wrong
    assert mc["mean_mutual_information"] == pytest.approx(0.0, abs=1e-12)
    histogram = mc["entropy_histogram"]
    assert len(histogram["edges"]) == 21 and histogram["edges"][-1] == pytest.approx(math.log(3))
    assert histogram["correct"] == [4] + [0] * 19 and histogram["wrong"] == [0] * 20


def test_wrong_predictions_with_higher_uncertainty_give_auroc_one():
    confident = torch.tensor([5.0, 0.0])  # p(0) = 0.9933 in every sample: right, little entropy, no MI
    disagreeing = [torch.tensor([-3.0, 3.0]), torch.tensor([1.0, -1.0])]  # mean p(1) = 0.558: wrong
    samples = torch.stack([
        torch.stack([confident, confident, disagreeing[t], confident, disagreeing[t]]) for t in range(2)
    ])
    labels = np.zeros(5, dtype=np.int64)
    deterministic = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 1.0], [5.0, 0.0], [1.0, 0.0]])
    result = as_json(evaluate_classification(samples, deterministic, labels))
    mc = result["mc"]
    assert mc["accuracy"] == pytest.approx(3 / 5)
    assert mc["auroc_predictive_entropy"] == 1.0
    assert mc["auroc_mutual_information"] == 1.0
    for name in ("entropy_histogram", "mutual_information_histogram"):
        assert sum(mc[name]["correct"]) == 3 and sum(mc[name]["wrong"]) == 2
    assert mc["mutual_information_histogram"]["correct"][0] == 3  # no MI when the samples agree
    assert mc["mean_predictive_entropy"] > mc["mean_mutual_information"] > 0
    assert result["deterministic"]["accuracy"] == pytest.approx(4 / 5)


def test_one_sample_matches_the_deterministic_pass_by_hand():
    probabilities = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    logits = probabilities.log()
    result = as_json(evaluate_classification(logits[None], logits, labels, n_bins=4))
    assert result["mc"]["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.3) + math.log(0.6) + math.log(0.8)) / 4)
    assert result["mc"]["brier"] == pytest.approx((0.02 + 0.98 + 0.32 + 0.08) / 4)
    # bins (0.5, 0.75]: {0.6 right, 0.7 wrong}, (0.75, 1]: {0.8 right, 0.9 right}
    assert result["mc"]["ece"] == pytest.approx(0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.85))
    assert [b["count"] for b in result["mc"]["reliability"]] == [0, 0, 2, 2]
    for key in ("accuracy", "nll", "brier", "ece"):
        assert result["mc"][key] == pytest.approx(result["deterministic"][key])
    assert result["mc"]["reliability"] == result["deterministic"]["reliability"]
    assert result["mc"]["mean_mutual_information"] == pytest.approx(0.0, abs=1e-12)


def test_classification_shape_checks():
    with pytest.raises(ValueError):
        evaluate_classification(torch.zeros(2, 3, 4), torch.zeros(3, 5), np.zeros(3))
    with pytest.raises(ValueError):
        evaluate_classification(torch.zeros(2, 3, 4), torch.zeros(3, 4), np.zeros(2))


def test_regression_by_hand():
    samples = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    tau = 4.0
    result = as_json(evaluate_regression(samples, torch.tensor([2.0, 10.0]), np.array([2.0, 12.0]), tau))
    assert (result["n"], result["samples"], result["heteroscedastic"]) == (2, 2, False)
    mc = result["mc"]
    assert mc["rmse"] == pytest.approx(math.sqrt(2.0))  # errors 0 and 2
    # y = 2 between samples 1 and 3: log N(2; 1, 1/4) = log N(2; 3, 1/4) = log(2/pi)/2 - 2;
    # y = 12 at samples 10, 10: log(2/pi)/2 - 8
    assert mc["log_likelihood"] == pytest.approx(0.5 * math.log(2 / math.pi) - 5.0)
    assert mc["mean_std"] == pytest.approx((math.sqrt(1.25) + 0.5) / 2)
    assert mc["mean_epistemic_std"] == pytest.approx(0.5) and mc["mean_aleatoric_std"] == pytest.approx(0.5)
    assert mc["coverage_95"] == 0.5  # 2 in 2 +- 1.96 sqrt(1.25); 12 outside 10 +- 0.98
    deterministic = result["deterministic"]
    assert deterministic["rmse"] == pytest.approx(math.sqrt(2.0))
    assert deterministic["log_likelihood"] == pytest.approx(0.5 * math.log(2 / math.pi) - 4.0)
    assert deterministic["coverage_95"] == 0.5
    column = evaluate_regression(samples[..., None], torch.tensor([[2.0], [10.0]]), np.array([2.0, 12.0]), tau)
    assert column == result
    with pytest.raises(ValueError, match="tau"):
        evaluate_regression(samples, torch.tensor([2.0, 10.0]), np.array([2.0, 12.0]), None)


def test_heteroscedastic_regression_by_hand():
    means, log_variances = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, math.log(4.0)]])
    targets = np.array([1.0, 1.0])
    result = as_json(evaluate_regression((means, log_variances), (means[0], log_variances[0]), targets))
    assert result["heteroscedastic"] is True
    expected = 0.5 * ((-0.5 * math.log(2 * math.pi) - 0.5) + (-0.5 * math.log(8 * math.pi)))
    for part in ("mc", "deterministic"):
        assert result[part]["log_likelihood"] == pytest.approx(expected)
        assert result[part]["rmse"] == pytest.approx(math.sqrt(0.5))
        assert result[part]["coverage_95"] == 1.0  # |1 - 0| < 1.96, |1 - 1| = 0
    assert result["mc"]["mean_aleatoric_std"] == pytest.approx(1.5)
    assert result["mc"]["mean_epistemic_std"] == 0.0
    assert result["mc"]["mean_std"] == pytest.approx(1.5)
    narrow = evaluate_regression((means, log_variances - 5.0), (means[0], log_variances[0] - 5.0), targets)
    assert narrow["mc"]["coverage_95"] == 0.5  # std e^-2.5 misses y = 1 around mean 0
    with pytest.raises(ValueError, match="pairs"):
        evaluate_regression((means, log_variances), means[0], targets)


def test_outputs_are_json_safe_on_random_samples():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 50, 4, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    classification = evaluate_classification(logits, logits.mean(0), labels)
    json.dumps(classification, allow_nan=False)
    assert classification["mc"]["auroc_predictive_entropy"] is not None
    assert 0 <= classification["mc"]["ece"] <= 1
    regression = evaluate_regression(torch.randn(30, 50, generator=generator), torch.zeros(50),
                                     torch.randn(50, generator=generator), tau=1.0)
    json.dumps(regression, allow_nan=False)
    assert 0 <= regression["mc"]["coverage_95"] <= 1
