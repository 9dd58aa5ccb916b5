"""Log lines: JSON objects (one per line) or text, with the request id and run id of the code
that logged; request id validation. Pure: no services needed."""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from service.observability.context import (
    current_run_id,
    http_scope_var,
    log_context,
    new_request_id,
    valid_request_id,
)
from service.observability.logging import ContextFilter, JsonFormatter, TextFormatter


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"tests.observability.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, stream


def test_json_lines_parse_and_carry_the_context() -> None:
    logger, stream = capture(JsonFormatter())
    run_id = str(uuid.uuid4())
    logger.info("outside any request")
    with log_context(request_id="req-1.a_B", run_id=run_id):
        logger.warning('a "quoted"\nmulti-line message with ünïcode and a tab\t%s', "arg", extra={"epoch": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
    logger.info("after")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # newlines inside messages and tracebacks are escaped
    outside, inside, failed, after = (json.loads(line) for line in lines)
    assert outside["request_id"] is None and outside["run_id"] is None and after["request_id"] is None
    assert inside["msg"] == 'a "quoted"\nmulti-line message with ünïcode and a tab\targ'
    assert inside["level"] == "WARNING" and inside["logger"] == logger.name
    assert inside["request_id"] == "req-1.a_B" and inside["run_id"] == run_id
    assert inside["epoch"] == 3  # extra= fields are kept
    assert inside["ts"].endswith("Z") and "T" in inside["ts"]
    assert failed["run_id"] == run_id and "ValueError: boom" in failed["exc"]


def test_text_lines_show_the_ids_when_known() -> None:
    logger, stream = capture(TextFormatter())
    logger.info("plain")
    with log_context(request_id="r1", run_id=None):
        logger.info("in a request")
    plain, in_request = stream.getvalue().splitlines()
    assert plain.endswith(": plain") and "request_id" not in plain
    assert in_request.endswith("in a request [request_id=r1]")


def test_the_run_id_of_an_api_request_comes_from_its_routed_path() -> None:
    run_id = uuid.uuid4()
    for params, expected in [({"run_id": str(run_id)}, str(run_id)), ({"run_id": "not-a-uuid"}, None), ({}, None)]:
        token = http_scope_var.set({"type": "http", "path_params": params})
        try:
            assert current_run_id() == expected
        finally:
            http_scope_var.reset(token)
    assert current_run_id() is None


@pytest.mark.parametrize(
    ("given", "accepted"),
    [("abc-123", True), ("A.b_c-9", True), ("x" * 128, True), ("x" * 129, False), ("", False),
     ("has space", False), ("semi;colon", False), ("ünï", False), ("new\nline", False), (None, False), (42, False)],
)
def test_request_ids_are_validated(given: object, accepted: bool) -> None:
    assert valid_request_id(given) == (given if accepted else None)
    assert valid_request_id(new_request_id()) is not None
