"""Log lines for the API and the workers: JSON (one object per line) or text.

Every line carries the request id and the run id of the code that logged it, when known
(``service.observability.context``). Select with ``MCDROP_LOG_FORMAT=json|text``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from service.observability.context import current_request_id, current_run_id

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "request_id", "run_id", "taskName",
    "color_message",  # uvicorn: the message again, with terminal colours
}


class ContextFilter(logging.Filter):
    """Adds ``request_id`` and ``run_id`` (None when unknown) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        record.run_id = current_run_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, request_id, run_id,
    then exc (the traceback) and any ``extra=`` fields. Escaping is json.dumps's."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "run_id": getattr(record, "run_id", None),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, then ``[request_id=… run_id=…]`` when known."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        known = [f"{key}={value}" for key in ("request_id", "run_id") if (value := getattr(record, key, None))]
        if not known:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{' '.join(known)}]{newline}{rest}"


def configure_logging(level: str, log_format: str = "text") -> None:
    """One stderr handler on the root logger (replacing earlier ones); library loggers
    (uvicorn, celery, sqlalchemy) and Python warnings propagate to it. Not covered: the plain
    line Celery prints itself on shutdown ("worker: Warm shutdown (MainProcess)")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become log lines too (logger "py.warnings")
