"""The client commands of the CLI against a real HTTP server (uvicorn in a thread, the session's
PostgreSQL and Redis, auth on): JSON and --table output, exit status 1 with the problem detail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from service.api.app import create_app
from service.cli import app
from service.client import McdropClient
from service.config import Settings
from service.runs.schemas import RunRead
from tests.client.test_client import DIGIT_ZERO
from tests.conftest import REPO, free_port


@pytest.fixture(scope="module")
def server_url(settings: Settings) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="cli-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def cli(server_url: str, api_key: str):
    runner = CliRunner()

    def invoke(*args: str, code: int = 0, env: dict[str, str] | None = None):
        result = runner.invoke(app, list(args), env={"MCDROP_URL": server_url, "MCDROP_API_KEY": api_key, **(env or {})})
        assert result.exit_code == code, f"exit {result.exit_code}:\n{result.output}\n{result.exception!r}"
        return result

    return invoke


def as_json(result) -> dict:
    return json.loads(result.stdout)


def test_datasets_add_list_show(cli, tmp_path: Path) -> None:
    wine = as_json(cli("datasets", "add", "wine via cli", "--builtin", "wine"))
    assert wine["name"] == "wine via cli" and wine["n_features"] == 13

    csv = tmp_path / "points.csv"
    csv.write_text("a,b,label\n" + "\n".join(f"{i},{i % 4},{'odd' if i % 2 else 'even'}" for i in range(16)))
    uploaded = as_json(cli("datasets", "add", "points", "--csv", str(csv), "--target", "label", "--task", "classification"))
    assert uploaded["class_names"] == ["even", "odd"] and uploaded["n_rows"] == 16

    page = as_json(cli("datasets", "list", "--limit", "1"))
    assert [item["id"] for item in page["items"]] == [uploaded["id"]] and page["next_cursor"]
    everything = as_json(cli("datasets", "list", "--all", "--limit", "2"))
    assert {wine["id"], uploaded["id"]} <= {item["id"] for item in everything["items"]}
    assert everything["next_cursor"] is None

    table = cli("datasets", "show", wine["id"], "--table").stdout.splitlines()
    assert table[0].split() == ["id", "name", "task", "n_rows", "n_features", "n_classes", "created_at"]
    assert table[1].startswith(wine["id"]) and "classification" in table[1]

    usage = cli("datasets", "add", "nothing", code=2)
    assert "either --builtin or --csv" in usage.output


def test_runs_submit_list_show_cancel(cli, tmp_path: Path) -> None:
    dataset = as_json(cli("datasets", "add", "iris via cli", "--builtin", "iris"))
    run = as_json(cli("runs", "submit", dataset["id"], "--layers", "16,8", "--dropout", "0.2,0.1", "--epochs", "2",
                      "--seed", "5", "--priority", "3"))
    assert run["status"] == "queued" and run["priority"] == 3
    assert run["spec"]["model"]["hidden_layers"] == [16, 8] and run["spec"]["model"]["dropout"] == [0.2, 0.1]
    assert run["spec"]["training"]["epochs"] == 2 and run["spec"]["training"]["seed"] == 5

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"dataset_id": dataset["id"], "model": {"hidden_layers": [4], "activation": "tanh"},
                                "training": {"epochs": 7, "learning_rate": 0.01}}))
    from_spec = as_json(cli("runs", "submit", "--spec", str(spec), "--epochs", "1"))
    assert from_spec["spec"]["model"]["activation"] == "tanh" and from_spec["spec"]["training"]["epochs"] == 1
    assert from_spec["spec"]["training"]["learning_rate"] == 0.01

    listed = as_json(cli("runs", "list", "--dataset", dataset["id"], "--limit", "1"))
    assert [item["id"] for item in listed["items"]] == [from_spec["id"]] and listed["next_cursor"]
    both = as_json(cli("runs", "list", "--dataset", dataset["id"], "--status", "queued", "--all", "--limit", "1"))
    assert [item["id"] for item in both["items"]] == [from_spec["id"], run["id"]]
    assert as_json(cli("runs", "show", run["id"]))["id"] == run["id"]

    for queued in (run, from_spec):
        assert as_json(cli("runs", "cancel", queued["id"]))["status"] == "cancelled"
    table = cli("runs", "list", "--dataset", dataset["id"], "--table").stdout.splitlines()
    assert table[0].split() == ["id", "status", "task", "epochs", "validation", "device", "created_at"]
    assert all(" cancelled " in line for line in table[1:]) and len(table) == 3

    refused = cli("runs", "cancel", run["id"], code=1)
    assert "HTTP 409" in refused.stderr and not refused.stdout
    invalid = cli("runs", "submit", dataset["id"], "--dropout", "1.5", code=1)
    assert "HTTP 422" in invalid.stderr and "model.dropout" in invalid.stderr
    assert "comma-separated numbers" in cli("runs", "submit", dataset["id"], "--layers", "a,b", code=2).output


def test_predict_metrics_and_evaluation_of_a_trained_run(cli, trained: RunRead, tmp_path: Path) -> None:
    run_id = str(trained.id)
    body = as_json(cli("predict", run_id, "--inputs", json.dumps([DIGIT_ZERO]), "--samples", "30", "--seed", "4"))
    assert body["samples"] == 30 and len(body["predictions"]) == 1
    one_row = as_json(cli("predict", run_id, "--inputs", json.dumps(DIGIT_ZERO), "--samples", "30", "--seed", "4"))
    assert one_row == body

    csv = tmp_path / "rows.csv"
    csv.write_text(",".join(f"pixel{i}" for i in range(64)) + "\n" + ",".join(map(str, DIGIT_ZERO)) + "\n")
    from_csv = as_json(cli("predict", run_id, "--csv", str(csv), "--samples", "30", "--seed", "4"))
    assert from_csv == body

    table = cli("predict", run_id, "--csv", str(csv), "--samples", "30", "--seed", "4", "--table").stdout.splitlines()
    assert table[0].split() == ["row", "label", "probability", "predictive_entropy", "expected_entropy",
                                "mutual_information"]
    assert table[1].split()[1] == body["predictions"][0]["label"]

    metrics = as_json(cli("runs", "metrics", run_id))
    assert [item["epoch"] for item in metrics["items"]] == [1, 2, 3]
    assert "mc" in as_json(cli("runs", "evaluation", run_id))

    wrong = cli("predict", run_id, "--inputs", "[[1, 2]]", code=1)
    assert "HTTP 422" in wrong.stderr
    assert "either --inputs or --csv" in cli("predict", run_id, code=2).output
    assert "not valid JSON" in cli("predict", run_id, "--inputs", "[1,", code=2).output


def test_errors_exit_1_with_the_problem_detail(cli, server_url: str) -> None:
    missing = str(uuid.uuid4())
    result = cli("runs", "show", missing, code=1)
    assert result.stderr.startswith("error: HTTP 404: ") and missing in result.stderr
    refused = cli("runs", "list", code=1, env={"MCDROP_API_KEY": "mcd_wrong"})
    assert "HTTP 401" in refused.stderr
    unreachable = cli("datasets", "list", "--url", f"http://127.0.0.1:{free_port()}", code=1)
    assert unreachable.stderr.startswith("error: GET http://127.0.0.1:") and "ConnectError" in unreachable.stderr


def test_the_installed_command_exits_1_on_an_api_error(server_url: str, api_key: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCDROP_")}
    env.update({"MCDROP_URL": server_url, "MCDROP_API_KEY": api_key})
    missing = str(uuid.uuid4())
    done = subprocess.run([sys.executable, "-m", "service.cli", "datasets", "show", missing], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "HTTP 404" in done.stderr and missing in done.stderr and not done.stdout


def test_models_register_promote_list_and_predict_by_name(cli, mcdrop: McdropClient, trained: RunRead) -> None:
    run_id = str(trained.id)
    version = as_json(cli("models", "register", "cli-digits", run_id))
    assert (version["name"], version["version"], version["run_id"]) == ("cli-digits", 1, run_id)
    moved = as_json(cli("models", "promote", "cli-digits", "1"))
    assert (moved["alias"], moved["version"]) == ("production", 1)

    mcdrop.set_alias_gates("cli-digits", "staging", [{"metric": "mc.accuracy", "op": ">=", "value": 2}])
    refused = cli("models", "promote", "cli-digits", "1", "--alias", "staging", code=1)
    assert "HTTP 409" in refused.stderr and "mc.accuracy" in refused.stderr

    table = cli("models", "list", "--table", "--all").stdout.splitlines()
    assert table[0].split() == ["name", "latest_version", "aliases", "updated_at"]
    assert any(line.startswith("cli-digits ") and "production->1" in line for line in table[1:])
    shown = as_json(cli("models", "show", "cli-digits"))
    assert [v["version"] for v in shown["versions"]] == [1] and shown["versions"][0]["aliases"] == ["production"]

    rows = json.dumps([DIGIT_ZERO])
    by_name = as_json(cli("predict", "--model", "cli-digits", "--inputs", rows, "--samples", "20", "--seed", "2"))
    by_version = as_json(cli("predict", "--model", "cli-digits", "--version", "1", "--inputs", rows, "--samples", "20",
                             "--seed", "2"))
    by_run = as_json(cli("predict", run_id, "--inputs", rows, "--samples", "20", "--seed", "2"))
    assert by_name == by_version == by_run
    assert "either a run id or --model" in cli("predict", run_id, "--model", "cli-digits", "--inputs", rows,
                                               code=2).output
    assert "HTTP 404" in cli("predict", "--model", "nope", "--inputs", rows, code=1).stderr


def test_the_client_reads_the_live_feed_over_http(server_url: str, api_key: str, trained: RunRead) -> None:
    """GET /v1/events never ends by itself: the client yields events as they come and closes
    the stream when the caller stops iterating."""
    import itertools

    with McdropClient(server_url, api_key, timeout=10) as mcdrop:
        feed = mcdrop.iter_events(after=0)
        first = list(itertools.islice(feed, 3))
        feed.close()  # what leaving a for loop early does
        assert len(first) == 3 and [e.id for e in first] == sorted(e.id for e in first)
        ours = []
        for event in mcdrop.iter_events(after=0, kind="train"):  # history first: ends at the run's last event
            if event.run_id == trained.id:
                ours.append(event)
                if event.status == "succeeded":
                    break
        assert [e.status for e in ours if e.kind == "status"] == ["queued", "running", "succeeded"]
        assert mcdrop.health() == {"status": "ok"}  # the connection pool is still usable


def test_submit_wait_follows_the_run_to_its_end(cli, mcdrop: McdropClient) -> None:
    """`runs submit --wait` polls until the run ends and exits 1 unless it succeeded (here it is
    cancelled meanwhile; no worker runs in this module)."""
    dataset = mcdrop.create_dataset("iris to wait on", builtin="iris")
    outcome: dict = {}
    waiting = threading.Thread(target=lambda: outcome.update(
        result=cli("runs", "submit", str(dataset.id), "--epochs", "1", "--wait", code=1)))
    waiting.start()
    deadline = time.monotonic() + 30
    while not (queued := mcdrop.list_runs(dataset_id=dataset.id).items):
        assert time.monotonic() < deadline, "the run was not submitted"
        time.sleep(0.1)
    time.sleep(0.5)  # still waiting on a queued run
    assert waiting.is_alive()
    mcdrop.cancel_run(queued[0].id)
    waiting.join(timeout=30)
    assert not waiting.is_alive() and as_json(outcome["result"])["status"] == "cancelled"
