"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) against a real API
process and a real Celery worker on the tests' PostgreSQL and Redis, with auth on.

Enter the API key at the prompt, add a data set and submit a run from the form, watch it reach
`succeeded` in the runs table without a reload, open its curves and evaluation, predict in the
playground and read the uncertainty back from the page (checked against the API with the same
seed); then a sweep from its form to its heatmap. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.conftest import Process, free_port, make_key, settings_env, wait_until_ready

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium (make test installs it)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
expect = sync_api.expect

# Flags for a closed network: no background requests to Google's hosts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps"]


@pytest.fixture(scope="module")
def api_server(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mcdrop serve` (auth on) and a Celery worker, each in its own process, started together."""
    logs = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    env = settings_env(settings) | {"MCDROP_HOST": "127.0.0.1", "MCDROP_PORT": str(port), "MCDROP_AUTH": "on"}
    api = Process([sys.executable, "-m", "service.cli", "serve"], env, logs / "api.log")
    # Every epoch recorded as it ends (the default batches them about once a second).
    worker = Process([sys.executable, "-m", "service.cli", "worker"],
                     settings_env(settings) | {"MCDROP_CHECKPOINT_INTERVAL_S": "0"}, logs / "worker.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, api)
        worker.wait_for_output(" ready.", timeout=90)
        yield base
    finally:
        worker.stop()
        api.stop()


@pytest.fixture(scope="module")
def tenant_key(settings: Settings) -> str:
    """A tenant of this module's own: its runs table holds only what these tests submit."""
    return make_key(settings, f"dashboard-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, api_server: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and "401" not in message.text
            and problems.append(f"console error: {message.text}"))
    loads: list[str] = []
    page.on("load", lambda p: loads.append(p.url))
    page.problems, page.loads = problems, loads
    yield page
    context.close()
    assert problems == [], problems


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def number(locator: Any) -> float:
    value = locator.get_attribute("data-value")
    assert value not in (None, ""), "no number on the page"
    return float(value)


def enter_key(page: Any, key: str) -> None:
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-save")


# Records every (status, progress) the run's row shows, as the page changes it.
RECORD_ROW_STATES = """(runId) => {
    window.__rowStates = [];
    const record = () => {
        const row = document.querySelector(`tr[data-run-id="${runId}"]`);
        if (!row) return;
        const state = [row.querySelector("[data-field=status]").textContent, row.querySelector("[data-field=progress] .text").textContent];
        const last = window.__rowStates[window.__rowStates.length - 1];
        if (!last || last[0] !== state[0] || last[1] !== state[1]) window.__rowStates.push(state);
    };
    record();
    new MutationObserver(record).observe(document.querySelector("#runs-table tbody"), { childList: true, subtree: true, characterData: true });
}"""


def test_submit_watch_inspect_and_predict(page: Any, api_server: str, tenant_key: str) -> None:
    api = httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=30)

    # The key prompt: the page asks, refuses a wrong key, keeps the right one for the session.
    page.goto(f"{api_server}/dashboard")
    expect(page.locator("#key-reason")).to_contain_text("API key")  # the API's 401 detail
    enter_key(page, "mcd_" + "x" * 43)
    expect(page.locator("#key-reason")).to_contain_text("refused")
    screenshot(page, "key-prompt")
    enter_key(page, tenant_key)
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#live")).to_have_text("● live")
    expect(page.get_by_text("No runs yet")).to_be_visible()
    page.evaluate("window.__sameDocument = true")

    # A data set and a run from the form.
    page.select_option("#builtin-name", "digits")
    page.click("#builtin-add")
    expect(page.locator("#run-dataset")).to_contain_text("digits (classification, 1797×64)")
    page.fill("#run-hidden", "64, 64")
    page.fill("#run-dropout", "0.5")
    page.fill("#run-epochs", "6")
    page.fill("#run-batch", "2")  # small batches: seconds of training, so "running" is seen live
    page.fill("#run-seed", "0")
    page.click("#run-submit")
    row = page.locator("#runs-table tbody tr").first
    run_id = row.get_attribute("data-run-id")
    assert run_id and uuid.UUID(run_id)
    created = api.get(f"/v1/runs/{run_id}").json()
    assert created["spec"]["model"] == {**created["spec"]["model"], "hidden_layers": [64, 64], "dropout": 0.5}
    assert created["spec"]["training"]["epochs"] == 6 and created["spec"]["training"]["seed"] == 0

    # Live, no reload: the row moves on by itself, through running, to succeeded, 6/6.
    page.evaluate(RECORD_ROW_STATES, run_id)
    expect(row.locator("[data-field=status]")).to_have_text("succeeded", timeout=90_000)
    expect(row.locator("[data-field=progress]")).to_contain_text("6/6")
    states = page.evaluate("window.__rowStates")
    assert "running" in [status for status, _ in states] and states[-1] == ["succeeded", "6/6"], states
    screenshot(page, "runs")
    finished = api.get(f"/v1/runs/{run_id}").json()
    assert finished["status"] == "succeeded" and finished["epochs_done"] == 6
    expect(row.locator("[data-field=score]")).to_have_text(f"{finished['latest_metrics']['val_accuracy']:.3f}")
    assert page.evaluate("window.__sameDocument") is True and len(page.loads) == 1

    # The run page: six epochs on the curves (from the event stream), the evaluation panel.
    row.locator(f"a[href='#/runs/{run_id}']").click()
    expect(page.locator("#epoch-rows tr")).to_have_count(6)
    expect(page.locator("#loss-chart canvas")).to_have_count(1)
    expect(page.locator("#score-chart canvas")).to_have_count(1)
    history = api.get(f"/v1/runs/{run_id}/metrics").json()["items"]
    last = page.locator("#epoch-rows tr").nth(5).locator("td")
    assert number(last.nth(2)) == pytest.approx(history[5]["val_loss"], rel=1e-12)
    evaluation = api.get(f"/v1/runs/{run_id}/evaluation").json()
    accuracy = page.locator("#evaluation-table tr[data-metric=accuracy] td")
    expect(accuracy.nth(1)).to_have_attribute("data-value", re.compile(r"^0\.\d+$"), timeout=20_000)
    assert number(accuracy.nth(1)) == pytest.approx(evaluation["mc"]["accuracy"])
    assert number(accuracy.nth(2)) == pytest.approx(evaluation["deterministic"]["accuracy"])
    expect(page.locator("#reliability-chart canvas")).to_have_count(1)
    expect(page.locator("#entropy-histogram canvas")).to_have_count(1)
    page.locator("summary", has_text="Per-epoch metrics").click()
    screenshot(page, "run")

    # The playground: a sample digit, T and a seed; the page's numbers are the API's.
    page.click("text=Predict with this run")
    expect(page.locator("#digit-pad")).to_be_visible()
    page.click("[data-sample='0']")
    page.fill("#predict-samples", "100")
    page.fill("#predict-seed", "7")
    page.click("#predict-button")
    results = page.locator("#predict-results[data-seed='7'][data-samples='100']")
    expect(results).to_be_visible()
    inputs = json.loads("[" + page.input_value("#predict-inputs") + "]")
    assert len(inputs) == 64
    reference = api.post(f"/v1/runs/{run_id}/predict", json={"inputs": [inputs], "samples": 100, "seed": 7}).json()
    expected = reference["predictions"][0]
    shown = {key: number(page.locator(f"[data-metric={key}]")) for key in ("predictive_entropy", "expected_entropy", "mutual_information")}
    probabilities = [number(cell) for cell in page.locator("#probabilities-table [data-field=probability]").all()]
    spreads = [number(cell) for cell in page.locator("#probabilities-table [data-field=std]").all()]
    assert len(probabilities) == 10 and math.isclose(sum(probabilities), 1.0, abs_tol=1e-6)
    assert shown["predictive_entropy"] >= shown["mutual_information"] >= 0
    assert shown["predictive_entropy"] >= shown["expected_entropy"] >= 0
    assert shown["predictive_entropy"] <= math.log(10) + 1e-9
    assert shown["predictive_entropy"] == pytest.approx(shown["expected_entropy"] + shown["mutual_information"], abs=1e-6)
    for key, value in shown.items():
        assert value == pytest.approx(expected[key], rel=1e-9), key
    assert probabilities == pytest.approx(expected["probabilities"], rel=1e-9)
    assert spreads == pytest.approx(expected["probabilities_std"], rel=1e-9)
    expect(page.locator("#predicted-label")).to_have_text(expected["label"])
    assert expected["label"] == "0"
    expect(page.locator("#probability-chart canvas")).to_have_count(1)
    screenshot(page, "predict")

    # A new seed gives new masks: the page follows.
    page.fill("#predict-seed", "8")
    page.click("#predict-button")
    expect(page.locator("#predict-results[data-seed='8']")).to_be_visible()
    assert number(page.locator("[data-metric=predictive_entropy]")) != shown["predictive_entropy"]
    assert len(page.loads) == 1


def test_sweep_from_the_form_to_its_heatmap(page: Any, api_server: str, tenant_key: str) -> None:
    api = httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=30)
    assert api.post("/v1/datasets", json={"name": "diabetes", "builtin": "diabetes"}).status_code == 201

    page.goto(f"{api_server}/dashboard/#/sweeps")
    enter_key(page, tenant_key)
    page.locator("summary", has_text="New sweep").click()
    expect(page.locator("#sweep-dataset")).to_contain_text("diabetes")
    diabetes = next(d for d in api.get("/v1/datasets").json()["items"] if d["name"] == "diabetes")
    page.select_option("#sweep-dataset", diabetes["id"])
    assert option_values(page, "#sweep-metric") == ["log_likelihood", "rmse"]
    expect(page.locator("#sweep-grid-tau")).to_be_visible()
    expect(page.locator("#sweep-grid-weight-decay")).to_be_hidden()
    page.fill("#sweep-hidden", "50")
    page.fill("#sweep-epochs", "20")
    page.fill("#sweep-grid-dropout", "0.01, 0.1")
    page.fill("#sweep-grid-tau", "0.1, 1")
    page.fill("#sweep-folds", "2")
    page.fill("#sweep-search-samples", "50")
    page.fill("#sweep-test-samples", "100")
    page.click("#sweep-submit")

    cells = page.locator("#heatmap-table td.cell")
    expect(cells).to_have_count(4, timeout=90_000)
    expect(page.locator("#sweep-status")).to_have_text("succeeded")
    sweep_id = page.url.rsplit("/", 1)[-1]
    sweep = api.get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["status"] == "succeeded" and sweep["n_configurations"] == 4 and sweep["n_splits"] == 2
    by_cell = {(e["configuration"]["dropout"], e["configuration"]["tau"]): e["validation"]["log_likelihood"]["mean"]
               for e in sweep["results"]["ranking"]}
    for cell in cells.all():
        key = (float(cell.get_attribute("data-x")), float(cell.get_attribute("data-y")))
        assert number(cell) == pytest.approx(by_cell[key], rel=1e-12), key
    best = page.locator("#heatmap-table td.cell.best")
    expect(best).to_have_count(1)
    assert number(best) == pytest.approx(max(by_cell.values()))
    expect(page.locator("#ranking-table tbody tr")).to_have_count(4)
    expect(page.locator("#sweep-test-table tbody tr")).to_have_count(2)
    assert option_values(page, "#heatmap-metric") == ["log_likelihood", "rmse"]
    assert option_values(page, "#heatmap-set") == ["validation"]
    test = sweep["results"]["test"]
    for key in ("rmse", "log_likelihood"):
        assert number(page.locator(f"#sweep-test .metric[data-metric={key}] .value")) == pytest.approx(test[key]["mean"], rel=1e-12)
    expect(page.locator("#sweep-test-compare")).to_have_count(0)  # no deterministic net in regression results
    screenshot(page, "sweep")


def option_values(page: Any, select: str) -> list[str]:
    return page.locator(f"{select} option").evaluate_all("options => options.map(o => o.value)")


def test_classification_sweep_shows_its_own_metrics(page: Any, api_server: str, tenant_key: str) -> None:
    """A classification sweep from the form: the form offers classification's ranking metrics and
    fields; the heatmap, ranking and test panel show accuracy, NLL, Brier, ECE (MC dropout beside
    the deterministic net) on validation, training and test rows and their gap, as the API has them."""
    api = httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {tenant_key}"}, timeout=30)
    created = api.post("/v1/datasets", json={"name": "iris-sweep", "builtin": "iris"})
    assert created.status_code == 201, created.text
    iris = created.json()
    assert iris["task"] == "classification"

    page.goto(f"{api_server}/dashboard/#/sweeps")
    enter_key(page, tenant_key)
    page.locator("summary", has_text="New sweep").click()
    expect(page.locator("#sweep-dataset")).to_contain_text("iris-sweep (classification")
    page.select_option("#sweep-dataset", iris["id"])
    assert option_values(page, "#sweep-metric") == ["nll", "accuracy", "brier"]
    expect(page.locator("#sweep-grid-tau")).to_be_hidden()
    expect(page.locator("#sweep-lengthscale")).to_be_hidden()
    expect(page.locator("#sweep-grid-weight-decay")).to_be_visible()
    expect(page.locator("#sweep-grid-dropout")).to_have_value("0.1, 0.3, 0.5")  # classification's defaults
    expect(page.locator("#sweep-tie")).not_to_be_checked()
    page.fill("#sweep-hidden", "16")
    page.fill("#sweep-epochs", "15")
    page.fill("#sweep-batch", "16")
    page.fill("#sweep-learning-rate", "0.01")
    page.fill("#sweep-grid-dropout", "0.1, 0.3")
    page.fill("#sweep-grid-weight-decay", "0, 0.001")
    page.fill("#sweep-folds", "2")
    page.select_option("#sweep-metric", "accuracy")
    page.check("#sweep-test-every")
    page.fill("#sweep-search-samples", "20")
    page.fill("#sweep-test-samples", "30")
    screenshot(page, "sweep-form-classification")
    page.click("#sweep-submit")

    cells = page.locator("#heatmap-table td.cell")
    expect(cells).to_have_count(4, timeout=90_000)
    expect(page.locator("#sweep-status")).to_have_text("succeeded")
    sweep_id = page.url.rsplit("/", 1)[-1]
    sweep = api.get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["spec"]["metric"] == "accuracy" and sweep["spec"]["grid"] == {**sweep["spec"]["grid"], "dropout": [0.1, 0.3], "weight_decay": [0.0, 0.001]}
    assert sweep["spec"]["model"].get("tau") is None and sweep["spec"]["training"]["learning_rate"] == 0.01
    ranking = sweep["results"]["ranking"]
    expect(page.locator("#sweep-summary")).to_contain_text("ranked by validation accuracy")

    def heatmap_matches(part: str, metric: str, best: Any) -> None:
        expect(page.locator(f"#heatmap-table[data-set={part}][data-metric={metric}]")).to_have_count(1)
        by_cell = {(e["configuration"]["dropout"], e["configuration"]["weight_decay"]): e[part][metric]["mean"] for e in ranking}
        for cell in cells.all():
            key = (float(cell.get_attribute("data-x")), float(cell.get_attribute("data-y")))
            assert number(cell) == pytest.approx(by_cell[key], rel=1e-12), (part, metric, key)
        outlined = page.locator("#heatmap-table td.cell.best").all()  # accuracies can tie
        assert outlined and all(number(cell) == pytest.approx(best(by_cell.values())) for cell in outlined)

    # The heatmap opens on the ranking metric; it offers every metric the results hold, on every row set.
    heatmap_matches("validation", "accuracy", max)
    assert option_values(page, "#heatmap-set") == ["validation", "train", "gap", "test"]
    metrics = option_values(page, "#heatmap-metric")
    assert metrics[:4] == ["accuracy", "deterministic_accuracy", "nll", "deterministic_nll"]
    assert set(metrics) == set(ranking[0]["validation"])
    page.select_option("#heatmap-metric", "nll")
    heatmap_matches("validation", "nll", min)  # lower is better
    page.select_option("#heatmap-set", "gap")
    heatmap_matches("gap", "nll", lambda gaps: min(gaps, key=abs))  # the smallest gap
    page.select_option("#heatmap-set", "test")
    heatmap_matches("test", "nll", min)

    # The ranking: best first by validation accuracy, the NLL gap beside; training rows and the deterministic net on demand.
    rows = page.locator("#ranking-table tbody tr")
    expect(rows).to_have_count(4)
    headers = page.locator("#ranking-table thead th[data-metric]").evaluate_all("cells => cells.map(c => c.dataset.metric)")
    assert headers[:4] == ["accuracy", "nll", "brier", "ece"] and headers[-1] == "gap:accuracy"
    for row, entry in zip(rows.all(), ranking):
        assert row.get_attribute("data-configuration") == str(entry["configuration"]["index"])
        assert number(row.locator("td[data-metric=accuracy]")) == pytest.approx(entry["validation"]["accuracy"]["mean"], rel=1e-12)
        assert number(row.locator("td[data-metric=ece]")) == pytest.approx(entry["validation"]["ece"]["mean"], rel=1e-12)
        assert number(row.locator("td[data-metric='gap:accuracy']")) == pytest.approx(entry["gap"]["accuracy"]["mean"], rel=1e-12)
    page.select_option("#ranking-set", "train")
    page.select_option("#ranking-net", "deterministic")
    expect(page.locator("#ranking-table[data-set=train][data-net=deterministic]")).to_have_count(1)
    assert number(rows.first.locator("td[data-metric=deterministic_nll]")) == pytest.approx(ranking[0]["train"]["deterministic_nll"]["mean"], rel=1e-12)

    # The retrained best per split, tested: MC dropout beside the deterministic net.
    test = sweep["results"]["test"]
    for key in ("accuracy", "nll", "brier", "ece"):
        assert number(page.locator(f"#sweep-test .metric[data-metric={key}] .value")) == pytest.approx(test[key]["mean"], rel=1e-12)
        row = page.locator(f"#sweep-test-compare tr[data-metric={key}]")
        assert number(row.locator("[data-side=mc]")) == pytest.approx(test[key]["mean"], rel=1e-12)
        assert number(row.locator("[data-side=deterministic]")) == pytest.approx(test[f"deterministic_{key}"]["mean"], rel=1e-12)
    expect(page.locator("#sweep-test-table tbody tr")).to_have_count(2)
    split = page.locator("#sweep-test-table tbody tr").first
    assert number(split.locator("td[data-metric=deterministic_accuracy]")) == pytest.approx(test["per_split"][0]["deterministic_accuracy"], rel=1e-12)
    page.select_option("#heatmap-set", "validation")
    page.select_option("#heatmap-metric", "accuracy")
    page.select_option("#ranking-set", "validation")
    page.select_option("#ranking-net", "mc")
    screenshot(page, "sweep-classification")


# Results with keys missing here and there, as older or partial sweeps may have them.
PARTIAL_SWEEPS = [
    {"spec": {}, "results": {}},
    {"spec": {"grid": {"dropout": [0.1, 0.2]}, "metric": "nll"}, "results": {"metric": "nll", "ranking": [
        {"configuration": {"index": 0, "dropout": 0.1}, "validation": {"nll": {"mean": 0.5, "se": None}, "accuracy": {"mean": None, "se": None}}},
        {"configuration": {"index": 1, "dropout": 0.2}, "validation": {}},
        {"validation": {"nll": None, "brier": {"mean": 0.1}}, "gap": {"nll": {"mean": -0.2, "se": 0.1}}},
        None,
    ], "test": {"accuracy": {"mean": 0.9, "se": None}, "deterministic_nll": {"mean": 0.3, "se": 0.01}, "samples": 10,
                "per_split": [{"split": 0, "configuration": 7}, {}]}}},
    {"spec": {"grid": {"tau": [0.1]}}, "results": {"metric": "rmse", "ranking": [{"configuration": {"index": 0, "tau": 0.1}}], "test": {"per_split": None}}},
    {"spec": {"grid": {"hidden_layers": [[8], [8, 8]]}}, "results": {"ranking": [
        {"configuration": {"index": 0, "hidden_layers": [8]}, "validation": {"some_new_score": {"mean": 1.0, "se": 0.1}}},
        {"configuration": {"index": 1, "hidden_layers": [8, 8]}, "validation": {"some_new_score": {"mean": 2.0, "se": 0.1}}}]}},
]


def test_sweep_results_with_missing_keys_render(page: Any, api_server: str) -> None:
    """The results view draws whatever part of the results is there, and never throws."""
    page.goto(f"{api_server}/dashboard/")
    drawn = page.evaluate(
        """async (sweeps) => {
            const { resultSections } = await import("/dashboard/js/pages/sweeps.js");
            return sweeps.map((sweep) => {
                const root = document.createElement("div");
                for (const task of ["classification", "regression", undefined]) root.append(...resultSections(structuredClone(sweep), task));
                return { cells: [...root.querySelectorAll("#heatmap-table td.cell")].map((c) => c.dataset.value ?? null),
                         rows: root.querySelectorAll("#ranking-table tbody tr").length, text: root.textContent };
            });
        }""",
        PARTIAL_SWEEPS,
    )
    assert [d["rows"] for d in drawn] == [0, 3 * 3, 3 * 1, 3 * 2]
    assert "No configurations" in drawn[0]["text"]
    assert drawn[1]["cells"][:2] == ["0.5", None] and "Test accuracy" in drawn[1]["text"]
    assert "The results hold no metric" in drawn[2]["text"]
    assert drawn[3]["cells"][:2] == ["1", "2"] and "some new score" in drawn[3]["text"]
    assert all("undefined" not in d["text"] and "NaN" not in d["text"] for d in drawn)


STREAM = ('retry: 1500\r\n: a comment\r\nid: 7\r\nevent: epoch\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
          "event: ready\ndata: x\n\ndata: y\r\rid: 9\nevent: status\ndata:no-space\n\n: ping\r\n\r\n")
PARSED = [
    {"event": "epoch", "data": '{"a":\n1}', "id": "7"},
    {"event": "ready", "data": "x", "id": "7"},
    {"event": "message", "data": "y", "id": "7"},
    {"event": "status", "data": "no-space", "id": "9"},
]


def test_event_stream_parser_in_the_browser(page: Any, api_server: str) -> None:
    """The dashboard's text/event-stream parser, however the stream is cut into chunks."""
    page.goto(f"{api_server}/dashboard/")  # for the origin; the module is imported on its own below
    results = page.evaluate(
        """async (text) => {
            const { EventStreamParser } = await import("/dashboard/js/api.js");
            const runs = [];
            for (let cut = 0; cut <= text.length; cut++) {
                const parser = new EventStreamParser();
                runs.push({ messages: [...parser.feed(text.slice(0, cut)), ...parser.feed(text.slice(cut))], retry: parser.retry });
            }
            const parser = new EventStreamParser();
            const messages = [];
            for (const character of text) messages.push(...parser.feed(character));
            runs.push({ messages, retry: parser.retry });
            return runs;
        }""",
        STREAM,
    )
    assert len(results) == len(STREAM) + 2
    for result in results:
        assert result == {"messages": PARSED, "retry": 1500}
