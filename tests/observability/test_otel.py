"""MCDROP_OTEL: FastAPI's OpenTelemetry instrumentation is off unless asked for, and when asked
for it reports to the tracer provider an OpenTelemetry SDK would set up (a recording one here,
in place of the global provider for the test: there is no SDK in the environment)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace

from service.api.app import create_app
from service.config import Settings


class _RecordingTracer(trace.NoOpTracer):
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def start_span(self, name: str, *args, **kwargs) -> trace.Span:  # noqa: ANN002, ANN003
        self.names.append(name)
        return super().start_span(name, *args, **kwargs)


class _RecordingProvider(trace.TracerProvider):  # not a NoOpTracerProvider: FastAPI skips those
    def __init__(self) -> None:
        self.names: list[str] = []

    def get_tracer(self, *args, **kwargs) -> trace.Tracer:  # noqa: ANN002, ANN003
        return _RecordingTracer(self.names)


@pytest.mark.parametrize("otel", [False, True])
def test_spans_only_when_asked_for(settings: Settings, monkeypatch: pytest.MonkeyPatch, otel: bool) -> None:
    provider = _RecordingProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    app = create_app(settings.model_copy(update={"otel": otel, "reconcile_interval_s": 0.0,
                                                 "registry_refresh_interval_s": 0.0}))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
    assert bool(provider.names) is otel, provider.names  # the server span starts as "GET"


def test_off_by_default() -> None:
    assert Settings.model_fields["otel"].default is False
