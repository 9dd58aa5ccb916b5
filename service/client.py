"""A typed, synchronous Python client for the mcdrop HTTP API (used by the CLI and the tests).

    from service.client import McdropClient

    with McdropClient("http://127.0.0.1:8000", api_key="mcd_...") as mcdrop:
        digits = mcdrop.create_dataset("digits", builtin="digits")
        run = mcdrop.create_run({"dataset_id": digits.id, "training": {"epochs": 10}})
        run = mcdrop.wait_for_run(run.id)
        prediction = mcdrop.predict(run.id, [[0.0] * 64], samples=100, seed=7)
        prediction.predictions[0].mutual_information

Methods return the pydantic schemas the API itself answers with (``DatasetRead``, ``RunRead``,
``PredictResponse``, ...). Every non-2xx answer raises :class:`ApiError` with the problem+json
``status``, ``detail`` and ``errors``; a server that cannot be reached raises
:class:`ConnectionFailed`. ``iter_*`` methods follow ``next_cursor`` through every page.

``transport`` takes an ``httpx`` transport (e.g. ``httpx.MockTransport``), or an existing
``httpx.Client`` (FastAPI's ``TestClient`` is one) which is then used as is, with its own base URL.

:data:`ENDPOINTS` maps every (method, path) of the API to the client methods that call it;
tests/client/test_coverage.py fails when a route has no client method.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from service.auth.schemas import KeyCreated, KeyList, KeyRead
from service.batch_predictions.schemas import BatchPredictionCreate, BatchPredictionList, BatchPredictionRead
from service.datasets.schemas import DatasetList, DatasetRead
from service.jobs.schemas import DeliveryList
from service.registry.schemas import (
    AcquireResponse,
    AliasRead,
    GateCondition,
    ModelVersionList,
    ModelVersionRead,
    RegisteredModelList,
    RegisteredModelRead,
)
from service.runs.schemas import MetricsList, PredictResponse, RunCreate, RunList, RunRead
from service.sweeps.schemas import SweepCreate, SweepList, SweepRead

if TYPE_CHECKING:  # these pull in SQLAlchemy: imported when first used
    from service.jobs.workers_registry import QueueRead
    from service.runs.events import RunEventRead

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
IDEMPOTENCY_HEADER = "Idempotency-Key"

Sort = Literal["-created_at", "created_at"]
Id = uuid.UUID | str
Schema = TypeVar("Schema", bound=BaseModel)
Item = TypeVar("Item", bound=BaseModel)

# (HTTP method, path template) -> the client methods that call it. Keep it complete: the
# coverage test walks the OpenAPI paths and fails on a route missing here.
ENDPOINTS: dict[tuple[str, str], tuple[str, ...]] = {
    # health
    ("GET", "/healthz"): ("health",),
    ("GET", "/readyz"): ("ready",),
    # keys
    ("POST", "/v1/keys"): ("create_key",),
    ("GET", "/v1/keys"): ("list_keys",),
    ("POST", "/v1/keys/{key_id}/revoke"): ("revoke_key",),
    # datasets
    ("POST", "/v1/datasets"): ("create_dataset", "upload_dataset"),
    ("GET", "/v1/datasets"): ("list_datasets", "iter_datasets"),
    ("GET", "/v1/datasets/{dataset_id}"): ("get_dataset",),
    # runs
    ("POST", "/v1/runs"): ("create_run",),
    ("GET", "/v1/runs"): ("list_runs", "iter_runs"),
    ("GET", "/v1/runs/{run_id}"): ("get_run", "wait_for_run"),
    ("POST", "/v1/runs/{run_id}/cancel"): ("cancel_run",),
    ("POST", "/v1/runs/{run_id}/predict"): ("predict",),
    ("GET", "/v1/runs/{run_id}/metrics"): ("get_run_metrics",),
    ("GET", "/v1/runs/{run_id}/evaluation"): ("get_run_evaluation",),
    ("GET", "/v1/runs/{run_id}/deliveries"): ("list_run_deliveries",),
    ("GET", "/v1/runs/{run_id}/events"): ("iter_run_events",),
    ("GET", "/v1/events"): ("iter_events",),
    # sweeps
    ("POST", "/v1/sweeps"): ("create_sweep",),
    ("GET", "/v1/sweeps"): ("list_sweeps", "iter_sweeps"),
    ("GET", "/v1/sweeps/{sweep_id}"): ("get_sweep",),
    ("POST", "/v1/sweeps/{sweep_id}/cancel"): ("cancel_sweep",),
    # queue
    ("GET", "/v1/queue"): ("get_queue",),
    # model registry
    ("POST", "/v1/models"): ("register_model",),
    ("GET", "/v1/models"): ("list_models", "iter_models"),
    ("GET", "/v1/models/{name}"): ("get_model",),
    ("GET", "/v1/models/{name}/versions"): ("list_model_versions", "iter_model_versions"),
    ("PUT", "/v1/models/{name}/aliases/{alias}"): ("set_alias",),
    ("DELETE", "/v1/models/{name}/aliases/{alias}"): ("delete_alias",),
    ("PUT", "/v1/models/{name}/aliases/{alias}/gates"): ("set_alias_gates",),
    ("POST", "/v1/models/{name}/predict"): ("predict_model",),
    ("POST", "/v1/models/{name}/acquire"): ("acquire",),
    # batch predictions
    ("POST", "/v1/batch-predictions"): ("create_batch_prediction", "upload_batch_prediction"),
    ("GET", "/v1/batch-predictions"): ("list_batch_predictions", "iter_batch_predictions"),
    ("GET", "/v1/batch-predictions/{job_id}"): ("get_batch_prediction", "wait_for_batch_prediction"),
    ("POST", "/v1/batch-predictions/{job_id}/cancel"): ("cancel_batch_prediction",),
    ("GET", "/v1/batch-predictions/{job_id}/results"): ("download_batch_prediction",),
    # Open Inference Protocol (KServe V2)
    ("GET", "/v2"): ("v2_server_metadata",),
    ("GET", "/v2/health/live"): ("v2_live",),
    ("GET", "/v2/health/ready"): ("v2_ready",),
    ("GET", "/v2/models/{name}"): ("v2_model_metadata",),
    ("GET", "/v2/models/{name}/versions/{version}"): ("v2_model_metadata",),
    ("GET", "/v2/models/{name}/ready"): ("v2_model_ready",),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): ("v2_model_ready",),
    ("POST", "/v2/models/{name}/infer"): ("v2_infer",),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): ("v2_infer",),
}


class McdropError(Exception):
    """Base class of the client's errors."""


class ApiError(McdropError):
    """The API answered with an error (4xx/5xx): the problem+json ``status``, ``detail`` and
    ``errors`` (each ``{"loc": [...], "msg": ..., "type": ...}``), and the whole ``body``."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None, body: Any = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.body = body
        self.headers = dict(headers or {})
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"HTTP {self.status}: {self.detail}"]
        for error in self.errors[:20]:
            loc = ".".join(str(part) for part in error.get("loc", ()))
            lines.append(f"  {loc}: {error.get('msg', '')}" if loc else f"  {error.get('msg', '')}")
        return "\n".join(lines)

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        detail, errors = "", None
        if isinstance(body, dict):
            # problem+json ({"detail", "errors"}); KServe V2 errors are {"error": "..."}
            detail = str(body.get("detail") or body.get("error") or body.get("title") or "")
            if isinstance(body.get("errors"), list):
                errors = [e for e in body["errors"] if isinstance(e, dict)]
        elif isinstance(body, str):
            detail = body.strip()[:500]
        return cls(response.status_code, detail or response.reason_phrase, errors, body, response.headers)


class ConnectionFailed(McdropError):
    """The server could not be reached (refused, DNS, timeout)."""


class McdropClient:
    """The mcdrop API over HTTP; see the module docstring. Use as a context manager or call close()."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        transport: httpx.BaseTransport | httpx.Client | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._headers = dict(headers or {})
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if isinstance(transport, httpx.Client):
            self._http, self._owned = transport, False
        else:
            self._http = httpx.Client(base_url=base_url.rstrip("/"), transport=transport, timeout=self._timeout)
            self._owned = True

    # -- plumbing ------------------------------------------------------------------------

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> McdropClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    def request(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json_body: Any = None,
        headers: Mapping[str, str] | None = None, timeout: float | httpx.Timeout | None = None, **kwargs: Any,
    ) -> httpx.Response:
        """One request; raises ApiError on a 4xx/5xx answer and ConnectionFailed if unreachable."""
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        if timeout is not None:
            kwargs["timeout"] = timeout  # otherwise the client's own (an existing client keeps its own)
        try:
            response = self._http.request(
                method, path, params=query or None, json=json_body, headers={**self._headers, **(headers or {})},
                **kwargs,
            )
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    def _get(self, schema: type[Schema], path: str, **params: Any) -> Schema:
        return schema.model_validate_json(self.request("GET", path, params=params).content)

    def _post(self, schema: type[Schema], path: str, body: Any = None, *, idempotency_key: str | None = None,
              **kwargs: Any) -> Schema:
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key is not None else None
        response = self.request("POST", path, json_body=body, headers=headers, **kwargs)
        return schema.model_validate_json(response.content)

    def _pages(self, fetch: Callable[..., Any], **params: Any) -> Iterator[Any]:
        cursor = None
        while True:
            page = fetch(**params, cursor=cursor)
            yield from page.items
            cursor = page.next_cursor
            if cursor is None:
                return

    # -- health --------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """GET /healthz: the process is up."""
        return self.request("GET", "/healthz").json()

    def ready(self) -> dict[str, Any]:
        """GET /readyz: database and broker answer (ApiError 503 when not)."""
        return self.request("GET", "/readyz").json()

    # -- keys ----------------------------------------------------------------------------

    def create_key(self, name: str = "key") -> KeyCreated:
        """POST /v1/keys: a new key of the caller's tenant; ``.key`` is the secret, shown once."""
        return self._post(KeyCreated, "/v1/keys", {"name": name})

    def list_keys(self) -> KeyList:
        """GET /v1/keys: the tenant's keys (never their secrets)."""
        return self._get(KeyList, "/v1/keys")

    def revoke_key(self, key_id: Id) -> KeyRead:
        """POST /v1/keys/{key_id}/revoke."""
        return self._post(KeyRead, f"/v1/keys/{key_id}/revoke")

    # -- datasets ------------------------------------------------------------------------

    def create_dataset(self, name: str, builtin: str, *, idempotency_key: str | None = None) -> DatasetRead:
        """POST /v1/datasets (JSON): one of the built-in sets (digits, iris, wine, breast_cancer, diabetes)."""
        return self._post(DatasetRead, "/v1/datasets", {"name": name, "builtin": builtin},
                          idempotency_key=idempotency_key)

    def upload_dataset(
        self, name: str, file: str | Path | bytes | IO[bytes], *, target: str,
        task: Literal["classification", "regression"], idempotency_key: str | None = None,
    ) -> DatasetRead:
        """POST /v1/datasets (multipart): a CSV with a header row; every column but ``target`` numeric."""
        filename, content = _file(file)
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key is not None else None
        response = self.request(
            "POST", "/v1/datasets", headers=headers,
            data={"name": name, "target": target, "task": task}, files={"file": (filename, content, "text/csv")},
        )
        return DatasetRead.model_validate_json(response.content)

    def list_datasets(
        self, *, task: Literal["classification", "regression"] | None = None, limit: int | None = None,
        cursor: str | None = None, sort: Sort | None = None, created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> DatasetList:
        """GET /v1/datasets: one page (see next_cursor)."""
        return self._get(DatasetList, "/v1/datasets", task=task, limit=limit, cursor=cursor, sort=sort,
                         created_after=created_after, created_before=created_before)

    def iter_datasets(self, *, page_size: int = 100, **filters: Any) -> Iterator[DatasetRead]:
        """Every dataset, following the cursor through all pages (filters as list_datasets)."""
        return self._pages(self.list_datasets, limit=page_size, **filters)

    def get_dataset(self, dataset_id: Id) -> DatasetRead:
        """GET /v1/datasets/{dataset_id}."""
        return self._get(DatasetRead, f"/v1/datasets/{dataset_id}")

    # -- runs ----------------------------------------------------------------------------

    def create_run(self, spec: RunCreate | Mapping[str, Any], *, idempotency_key: str | None = None) -> RunRead:
        """POST /v1/runs: queue training (a RunCreate or the same as a dict). With an
        ``idempotency_key``, a retry with the same spec returns the same run."""
        return self._post(RunRead, "/v1/runs", _body(spec), idempotency_key=idempotency_key)

    def list_runs(
        self, *, status: str | None = None, dataset_id: Id | None = None, limit: int | None = None,
        cursor: str | None = None, sort: Sort | None = None, created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> RunList:
        """GET /v1/runs: one page, newest first unless sort="created_at"."""
        return self._get(RunList, "/v1/runs", status=status, dataset_id=dataset_id, limit=limit, cursor=cursor,
                         sort=sort, created_after=created_after, created_before=created_before)

    def iter_runs(self, *, page_size: int = 100, **filters: Any) -> Iterator[RunRead]:
        """Every run matching the filters (as list_runs), following next_cursor."""
        return self._pages(self.list_runs, limit=page_size, **filters)

    def get_run(self, run_id: Id) -> RunRead:
        """GET /v1/runs/{run_id}."""
        return self._get(RunRead, f"/v1/runs/{run_id}")

    def wait_for_run(self, run_id: Id, *, timeout: float = 600.0, poll_s: float = 0.5) -> RunRead:
        """Poll GET /v1/runs/{run_id} until the run has ended (succeeded, failed or cancelled);
        raises TimeoutError after ``timeout`` seconds."""
        return _wait(lambda: self.get_run(run_id), f"run {run_id}", timeout, poll_s)

    def cancel_run(self, run_id: Id) -> RunRead:
        """POST /v1/runs/{run_id}/cancel: a queued run at once, a running one at its next batch."""
        return self._post(RunRead, f"/v1/runs/{run_id}/cancel")

    def predict(
        self, run_id: Id, inputs: Sequence[Sequence[float]], *, samples: int = 100, seed: int | None = None,
    ) -> PredictResponse:
        """POST /v1/runs/{run_id}/predict: MC dropout with ``samples`` passes per input row."""
        return self._post(PredictResponse, f"/v1/runs/{run_id}/predict", _predict_body(inputs, samples, seed))

    def get_run_metrics(self, run_id: Id) -> MetricsList:
        """GET /v1/runs/{run_id}/metrics: per-epoch history."""
        return self._get(MetricsList, f"/v1/runs/{run_id}/metrics")

    def get_run_evaluation(self, run_id: Id) -> dict[str, Any]:
        """GET /v1/runs/{run_id}/evaluation: held-out metrics, MC dropout beside the deterministic net."""
        return self.request("GET", f"/v1/runs/{run_id}/evaluation").json()

    def list_run_deliveries(self, run_id: Id) -> DeliveryList:
        """GET /v1/runs/{run_id}/deliveries: webhook deliveries and their outcome."""
        return self._get(DeliveryList, f"/v1/runs/{run_id}/deliveries")

    def iter_run_events(self, run_id: Id, *, after: int | None = None) -> Iterator[RunEventRead]:
        """GET /v1/runs/{run_id}/events: the run's events (history, then live) until its terminal
        one. For a progress bar with reconnection, see ``mcdrop watch`` (service/watch.py)."""
        from service.runs.events import RunEventRead

        for message in self._stream(f"/v1/runs/{run_id}/events", {"after": after}):
            if message.event in ("status", "epoch"):
                yield RunEventRead.model_validate_json(message.data)

    def iter_events(self, *, kind: str | None = None, after: int | None = None) -> Iterator[RunEventRead]:
        """GET /v1/events: every run's events of the caller's tenant, live; never ends by itself
        (stop iterating to close it). Without ``after`` it starts with the next new event."""
        from service.runs.events import RunEventRead

        for message in self._stream("/v1/events", {"kind": kind, "after": after}):
            if message.event in ("status", "epoch"):
                yield RunEventRead.model_validate_json(message.data)

    def _stream(self, path: str, params: Mapping[str, Any]) -> Iterator[Any]:
        from service.watch import parse_event_stream

        query = {k: _param(v) for k, v in params.items() if v is not None}
        # Pings arrive every 15 s; a read waiting much longer is a dead connection.
        timeout = {"timeout": httpx.Timeout(self._timeout.connect or 10.0, read=60.0)} if self._owned else {}
        try:
            with self._http.stream("GET", path, params=query or None, **timeout,
                                   headers={**self._headers, "Accept": "text/event-stream"}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                yield from parse_event_stream(response.iter_lines())
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"GET {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc

    # -- sweeps --------------------------------------------------------------------------

    def create_sweep(self, spec: SweepCreate | Mapping[str, Any], *, idempotency_key: str | None = None) -> SweepRead:
        """POST /v1/sweeps: a grid of configurations × splits, trained as stacked networks."""
        return self._post(SweepRead, "/v1/sweeps", _body(spec), idempotency_key=idempotency_key)

    def list_sweeps(
        self, *, status: str | None = None, dataset_id: Id | None = None, limit: int | None = None,
        cursor: str | None = None, sort: Sort | None = None, created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> SweepList:
        """GET /v1/sweeps: one page."""
        return self._get(SweepList, "/v1/sweeps", status=status, dataset_id=dataset_id, limit=limit, cursor=cursor,
                         sort=sort, created_after=created_after, created_before=created_before)

    def iter_sweeps(self, *, page_size: int = 100, **filters: Any) -> Iterator[SweepRead]:
        """Every sweep matching the filters, following next_cursor."""
        return self._pages(self.list_sweeps, limit=page_size, **filters)

    def get_sweep(self, sweep_id: Id) -> SweepRead:
        """GET /v1/sweeps/{sweep_id}."""
        return self._get(SweepRead, f"/v1/sweeps/{sweep_id}")

    def cancel_sweep(self, sweep_id: Id) -> SweepRead:
        """POST /v1/sweeps/{sweep_id}/cancel."""
        return self._post(SweepRead, f"/v1/sweeps/{sweep_id}/cancel")

    # -- queue ---------------------------------------------------------------------------

    def get_queue(self) -> QueueRead:
        """GET /v1/queue: queued and running per queue, workers seen recently."""
        from service.jobs.workers_registry import QueueRead

        return self._get(QueueRead, "/v1/queue")

    # -- model registry ------------------------------------------------------------------

    def register_model(self, name: str, run_id: Id) -> ModelVersionRead:
        """POST /v1/models: a succeeded run becomes the next version of ``name`` (created on first use)."""
        return self._post(ModelVersionRead, "/v1/models", {"name": name, "run_id": str(run_id)})

    def list_models(
        self, *, limit: int | None = None, cursor: str | None = None, sort: Sort | None = None,
        created_after: datetime | None = None, created_before: datetime | None = None,
    ) -> RegisteredModelList:
        """GET /v1/models: one page of registered models with their aliases."""
        return self._get(RegisteredModelList, "/v1/models", limit=limit, cursor=cursor, sort=sort,
                         created_after=created_after, created_before=created_before)

    def iter_models(self, *, page_size: int = 100, **filters: Any) -> Iterator[RegisteredModelRead]:
        """Every registered model, following next_cursor."""
        return self._pages(self.list_models, limit=page_size, **filters)

    def get_model(self, name: str) -> RegisteredModelRead:
        """GET /v1/models/{name}."""
        return self._get(RegisteredModelRead, f"/v1/models/{_segment(name)}")

    def list_model_versions(
        self, name: str, *, limit: int | None = None, cursor: str | None = None, sort: Sort | None = None,
        created_after: datetime | None = None, created_before: datetime | None = None,
    ) -> ModelVersionList:
        """GET /v1/models/{name}/versions: one page, newest first."""
        return self._get(ModelVersionList, f"/v1/models/{_segment(name)}/versions", limit=limit, cursor=cursor,
                         sort=sort, created_after=created_after, created_before=created_before)

    def iter_model_versions(self, name: str, *, page_size: int = 100, **filters: Any) -> Iterator[ModelVersionRead]:
        """Every version of the model, following next_cursor."""
        return self._pages(lambda **params: self.list_model_versions(name, **params), limit=page_size, **filters)

    def set_alias(self, name: str, alias: str, version: int) -> AliasRead:
        """PUT /v1/models/{name}/aliases/{alias}: move (or create) the alias; ApiError 409 lists
        the gate conditions the version fails."""
        response = self.request("PUT", f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}",
                                json_body={"version": version})
        return AliasRead.model_validate_json(response.content)

    def set_alias_gates(self, name: str, alias: str, conditions: Sequence[GateCondition | Mapping[str, Any]]) -> AliasRead:
        """PUT /v1/models/{name}/aliases/{alias}/gates: conditions on the evaluation of any version
        the alias moves to later, e.g. ``{"metric": "mc.ece", "op": "<=", "value": 0.05}``; [] removes them."""
        body = {"conditions": [_body(condition) for condition in conditions]}
        response = self.request("PUT", f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}/gates", json_body=body)
        return AliasRead.model_validate_json(response.content)

    def delete_alias(self, name: str, alias: str) -> None:
        """DELETE /v1/models/{name}/aliases/{alias}."""
        self.request("DELETE", f"/v1/models/{_segment(name)}/aliases/{_segment(alias)}")

    def predict_model(
        self, name: str, inputs: Sequence[Sequence[float]], *, alias: str | None = None, version: int | None = None,
        samples: int = 100, seed: int | None = None,
    ) -> PredictResponse:
        """POST /v1/models/{name}/predict: as predict(), with the version at ``alias`` (default
        production) or ``version``."""
        response = self.request("POST", f"/v1/models/{_segment(name)}/predict", params={"alias": alias, "version": version},
                                json_body=_predict_body(inputs, samples, seed))
        return PredictResponse.model_validate_json(response.content)

    def acquire(
        self, name: str, *, inputs: Sequence[Sequence[float]] | None = None, dataset_id: Id | None = None,
        k: int = 10, strategy: str = "bald", samples: int = 100, seed: int | None = None,
        alias: str | None = None, version: int | None = None,
    ) -> AcquireResponse:
        """POST /v1/models/{name}/acquire: the top ``k`` rows of a pool (inline ``inputs`` or a
        ``dataset_id``) by bald, predictive_entropy or variation_ratio, for labelling."""
        body: dict[str, Any] = {"k": k, "strategy": strategy, "samples": samples}
        if inputs is not None:
            body["inputs"] = [[float(x) for x in row] for row in inputs]
        if dataset_id is not None:
            body["dataset_id"] = str(dataset_id)
        if seed is not None:
            body["seed"] = seed
        response = self.request("POST", f"/v1/models/{_segment(name)}/acquire", params={"alias": alias, "version": version},
                                json_body=body)
        return AcquireResponse.model_validate_json(response.content)

    # -- batch predictions ---------------------------------------------------------------

    def create_batch_prediction(
        self, spec: BatchPredictionCreate | Mapping[str, Any], *, idempotency_key: str | None = None,
    ) -> BatchPredictionRead:
        """POST /v1/batch-predictions (JSON): MC dropout over a dataset of the caller, by
        ``run_id`` or ``model`` ({"name", "alias" | "version"}), queued for the workers."""
        return self._post(BatchPredictionRead, "/v1/batch-predictions", _body(spec), idempotency_key=idempotency_key)

    def upload_batch_prediction(
        self, file: str | Path | bytes | IO[bytes], *, run_id: Id | None = None, model_name: str | None = None,
        model_alias: str | None = None, model_version: int | None = None, id_column: str | None = None,
        idempotency_key: str | None = None, **options: Any,
    ) -> BatchPredictionRead:
        """POST /v1/batch-predictions (multipart): a CSV of inputs; ``options`` are samples,
        seed, interval_level, chunk_rows, device, priority, callback_url."""
        filename, content = _file(file)
        fields = {"run_id": run_id, "model_name": model_name, "model_alias": model_alias,
                  "model_version": model_version, "id_column": id_column, **options}
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key is not None else None
        response = self.request(
            "POST", "/v1/batch-predictions", headers=headers,
            data={k: str(_param(v)) for k, v in fields.items() if v is not None},
            files={"file": (filename, content, "text/csv")},
        )
        return BatchPredictionRead.model_validate_json(response.content)

    def list_batch_predictions(
        self, *, status: str | None = None, model_run_id: Id | None = None, limit: int | None = None,
        cursor: str | None = None, sort: Sort | None = None, created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> BatchPredictionList:
        """GET /v1/batch-predictions: one page."""
        return self._get(BatchPredictionList, "/v1/batch-predictions", status=status, model_run_id=model_run_id,
                         limit=limit, cursor=cursor, sort=sort, created_after=created_after,
                         created_before=created_before)

    def iter_batch_predictions(self, *, page_size: int = 100, **filters: Any) -> Iterator[BatchPredictionRead]:
        """Every batch prediction matching the filters, following next_cursor."""
        return self._pages(self.list_batch_predictions, limit=page_size, **filters)

    def get_batch_prediction(self, job_id: Id) -> BatchPredictionRead:
        """GET /v1/batch-predictions/{job_id}: status and progress (rows_done / rows_total)."""
        return self._get(BatchPredictionRead, f"/v1/batch-predictions/{job_id}")

    def wait_for_batch_prediction(self, job_id: Id, *, timeout: float = 600.0, poll_s: float = 0.5) -> BatchPredictionRead:
        """Poll until the job has ended; raises TimeoutError after ``timeout`` seconds."""
        return _wait(lambda: self.get_batch_prediction(job_id), f"batch prediction {job_id}", timeout, poll_s)

    def cancel_batch_prediction(self, job_id: Id) -> BatchPredictionRead:
        """POST /v1/batch-predictions/{job_id}/cancel."""
        return self._post(BatchPredictionRead, f"/v1/batch-predictions/{job_id}/cancel")

    def download_batch_prediction(
        self, job_id: Id, *, format: Literal["csv", "parquet"] = "csv", to: str | Path | IO[bytes] | None = None,  # noqa: A002
    ) -> bytes | None:
        """GET /v1/batch-predictions/{job_id}/results: the results as CSV or Parquet; streamed
        into ``to`` (a path or binary file) when given, else returned as bytes."""
        path = f"/v1/batch-predictions/{job_id}/results"
        try:
            with self._http.stream("GET", path, params={"format": format}, headers=self._headers) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                if to is None:
                    return response.read()
                with contextlib.ExitStack() as stack:
                    target = stack.enter_context(Path(to).open("wb")) if isinstance(to, (str, Path)) else to
                    for chunk in response.iter_bytes():
                        target.write(chunk)
                return None
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"GET {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc

    # -- Open Inference Protocol (KServe V2): plain dicts, as V2 clients expect ------------

    def v2_server_metadata(self) -> dict[str, Any]:
        """GET /v2."""
        return self.request("GET", "/v2").json()

    def v2_live(self) -> dict[str, Any]:
        """GET /v2/health/live."""
        return self.request("GET", "/v2/health/live").json()

    def v2_ready(self) -> dict[str, Any]:
        """GET /v2/health/ready."""
        return self.request("GET", "/v2/health/ready").json()

    def v2_model_metadata(self, name: str, *, version: int | None = None, alias: str | None = None) -> dict[str, Any]:
        """GET /v2/models/{name} (the version at ``alias``, default production) or
        /v2/models/{name}/versions/{version}: input tensor and named outputs."""
        if version is not None:
            return self.request("GET", f"/v2/models/{_segment(name)}/versions/{version}").json()
        return self.request("GET", f"/v2/models/{_segment(name)}", params={"alias": alias}).json()

    def v2_model_ready(self, name: str, *, version: int | None = None, alias: str | None = None) -> dict[str, Any]:
        """GET /v2/models/{name}/ready or /v2/models/{name}/versions/{version}/ready."""
        if version is not None:
            return self.request("GET", f"/v2/models/{_segment(name)}/versions/{version}/ready").json()
        return self.request("GET", f"/v2/models/{_segment(name)}/ready", params={"alias": alias}).json()

    def v2_infer(
        self, name: str, rows: Sequence[Sequence[float]], *, version: int | None = None, alias: str | None = None,
        samples: int | None = None, seed: int | None = None, outputs: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """POST /v2/models/{name}/infer (or .../versions/{version}/infer) with ``rows`` as the
        FP32 tensor input-0; returns the V2 response (``outputs``: named tensors)."""
        data = [[float(x) for x in row] for row in rows]
        parameters = {k: v for k, v in (("samples", samples), ("seed", seed), ("alias", alias)) if v is not None}
        body: dict[str, Any] = {
            "parameters": parameters,
            "inputs": [{"name": "input-0", "shape": [len(data), len(data[0]) if data else 0], "datatype": "FP32",
                        "data": data}],
        }
        if outputs is not None:
            body["outputs"] = [{"name": output} for output in outputs]
        if request_id is not None:
            body["id"] = request_id
        if version is not None:
            path = f"/v2/models/{_segment(name)}/versions/{version}/infer"
        else:
            path = f"/v2/models/{_segment(name)}/infer"
        return self.request("POST", path, json_body=body).json()


def _segment(value: object) -> str:
    """A path segment, percent-encoded."""
    return quote(str(value), safe="")


def _file(file: str | Path | bytes | IO[bytes]) -> tuple[str, bytes]:
    if isinstance(file, (str, Path)):
        return Path(file).name, Path(file).read_bytes()
    if isinstance(file, bytes):
        return "data.csv", file
    return Path(getattr(file, "name", "data.csv")).name, file.read()


def _wait(read: Callable[[], Any], what: str, timeout: float, poll_s: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = read()
        if job.status in TERMINAL_STATUSES:
            return job
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} is still {job.status} after {timeout:g} s")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def _param(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, uuid.UUID) else value


def _body(spec: BaseModel | Mapping[str, Any]) -> Any:
    """A schema as JSON (fields the caller set, so the server fills in its own defaults, e.g. a seed)."""
    if isinstance(spec, BaseModel):
        return spec.model_dump(mode="json", exclude_unset=True)
    return json.loads(json.dumps(dict(spec), default=str))


def _predict_body(inputs: Sequence[Sequence[float]], samples: int, seed: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [[float(x) for x in row] for row in inputs], "samples": samples}
    if seed is not None:
        body["seed"] = seed
    return body
