"""Gate conditions against an evaluation report (pure logic, no database)."""

import pytest

from service.registry.schemas import GateCondition
from service.registry.service import failed_conditions, metric_value

REPORT = {"n": 359, "samples": 100, "mc": {"accuracy": 0.93, "ece": 0.04, "auroc_mutual_information": None,
                                           "reliability": [{"count": 3}]}}


def conditions(*items: tuple[str, str, float]) -> list[GateCondition]:
    return [GateCondition(metric=metric, op=op, value=value) for metric, op, value in items]


def test_metric_value_follows_dotted_paths_and_says_why_not() -> None:
    assert metric_value(REPORT, "mc.accuracy") == (0.93, None)
    assert metric_value(REPORT, "n") == (359.0, None)
    assert metric_value(REPORT, "mc.rmse")[1] == "mc.rmse is missing from the evaluation"
    assert "undefined" in metric_value(REPORT, "mc.auroc_mutual_information")[1]
    assert "not a number" in metric_value(REPORT, "mc.reliability")[1]
    assert "missing" in metric_value(REPORT, "mc.accuracy.deeper")[1]
    assert "no stored evaluation" in metric_value(None, "mc.ece")[1]


@pytest.mark.parametrize(("op", "value", "passes"), [
    ("<=", 0.04, True), ("<", 0.04, False), (">=", 0.04, True), (">", 0.04, False),
    ("==", 0.04, True), ("!=", 0.04, False), ("<=", 0.05, True), (">=", 0.05, False),
])
def test_each_operator(op: str, value: float, passes: bool) -> None:
    assert (failed_conditions(REPORT, conditions(("mc.ece", op, value))) == []) is passes


def test_failures_list_each_condition_with_the_actual_value() -> None:
    failed = failed_conditions(REPORT, conditions(
        ("mc.ece", "<=", 0.05), ("mc.accuracy", ">=", 0.95), ("mc.auroc_mutual_information", ">=", 0.8),
    ))
    assert [(item["loc"], item["metric"], item["actual"]) for item in failed] == [
        (["gates", 1], "mc.accuracy", 0.93), (["gates", 2], "mc.auroc_mutual_information", None),
    ]
    assert failed[0]["msg"] == "mc.accuracy = 0.93 is not >= 0.95"
    assert failed[1]["msg"] == "mc.auroc_mutual_information is undefined (null) in the evaluation"
    assert len(failed_conditions(None, conditions(("mc.ece", "<=", 1.0)))) == 1  # no evaluation fails every gate
