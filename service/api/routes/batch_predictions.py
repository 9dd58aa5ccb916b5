"""/v1/batch-predictions: MC dropout over a dataset or an uploaded CSV, run by the workers;
results as CSV or Parquet."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.deps import CurrentTenant, PageDep, SessionDep, SettingsDep
from service.api.uploads import read_limited, refuse_declared_oversize
from service.api.idempotency import IdempotencyKey, canonical, create_once
from service.batch_predictions import service as batch_predictions
from service.batch_predictions.schemas import (
    BatchPredictionCreate,
    BatchPredictionList,
    BatchPredictionOptions,
    BatchPredictionRead,
    ResultFormat,
)
from service.errors import InvalidInput, PayloadTooLarge
from service.jobs.idempotency import fingerprint
from service.runs.schemas import RunStatusName

router = APIRouter(prefix="/v1/batch-predictions", tags=["batch predictions"])

MAX_JSON_BODY = 64 * 1024
FORM_FIELDS = {
    "file": {"type": "string", "format": "binary", "description": "CSV with a header row: the model's features "
             "(any order), optionally an id column and the model's target column (carried into the results)"},
    "run_id": {"type": "string", "format": "uuid"},
    "model_name": {"type": "string", "description": "a registered model, instead of run_id"},
    "model_alias": {"type": "string"},
    "model_version": {"type": "integer", "minimum": 1},
    "id_column": {"type": "string", "description": "the column carried as `id` (default: a column named id)"},
    "samples": {"type": "integer", "minimum": 1, "maximum": 10000},
    "seed": {"type": "integer", "minimum": 0},
    "interval_level": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "chunk_rows": {"type": "integer", "minimum": 64, "maximum": 65536},
    "device": {"type": "string", "enum": ["auto", "cpu", "cuda"]},
    "priority": {"type": "integer", "minimum": 0, "maximum": 9},
    "callback_url": {"type": "string", "format": "uri"},
}
CREATE_DOC = (
    "Either a JSON body (`dataset_id` of the caller's dataset, and `run_id` or `model`) or a multipart "
    "form with a CSV `file` and the same options as fields (`model_name`, `model_alias`, `model_version` "
    "for a registered model). Answers 202 with the queued job; follow it with GET /v1/batch-predictions/{id} "
    "or GET /v1/runs/{id}/events, download with GET /v1/batch-predictions/{id}/results."
)


def _inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined (it is embedded in the OpenAPI document)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            if reference.startswith("#/$defs/"):
                return inline({**definitions[reference.removeprefix("#/$defs/")],
                               **{k: v for k, v in node.items() if k != "$ref"}})
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


def _body_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


async def _read_form(request: Request, settings: SettingsDep) -> tuple[BatchPredictionOptions, bytes, str, str | None]:
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS) + 4, max_part_size=settings.max_upload_bytes)
    upload = form.get("file")
    if upload is None:
        raise InvalidInput("the upload form needs a CSV `file`",
                           errors=[{"loc": ["body", "file"], "msg": "field required", "type": "missing"}])
    if not hasattr(upload, "read"):
        raise InvalidInput("`file` must be a file", errors=[{"loc": ["body", "file"], "msg": "not a file", "type": "file"}])
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name == "file":
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"`{name}` must be a plain field",
                               errors=[{"loc": ["body", name], "msg": "a file", "type": "string_type"}])
        if name in fields:
            raise InvalidInput(f"`{name}` is given twice", errors=[{"loc": ["body", name], "msg": "repeated", "type": "value_error"}])
        fields[name] = value
    id_column = fields.pop("id_column", None)
    if id_column is not None and not 1 <= len(id_column.strip()) <= 200:
        raise InvalidInput("id_column must have 1 to 200 characters",
                           errors=[{"loc": ["body", "id_column"], "msg": "bad length", "type": "string"}])
    reference = {key: fields.pop(f"model_{key}") for key in ("name", "alias", "version") if f"model_{key}" in fields}
    if reference:
        fields["model"] = reference
    try:
        options = BatchPredictionOptions.model_validate(fields)
    except ValidationError as exc:
        errors = _body_errors(exc)
        for error in errors:  # name the form fields as sent
            if error["loc"][1:2] == ["model"] and len(error["loc"]) > 2:
                error["loc"] = ["body", f"model_{error['loc'][2]}", *error["loc"][3:]]
        raise InvalidInput("the upload form is not valid", errors=errors) from None
    content = await read_limited(upload, settings.max_upload_bytes)  # type: ignore[arg-type]
    filename = getattr(upload, "filename", None) or "upload.csv"
    return options, content, filename, id_column.strip() if id_column is not None else None


@router.post(
    "", status_code=202, response_model=BatchPredictionRead, description=CREATE_DOC,
    responses={200: {"description": "replay of an earlier request with the same Idempotency-Key", "model": BatchPredictionRead},
               409: {"description": "the model's run has not succeeded"},
               413: {"description": "the upload is too large"},
               422: {"description": "invalid options, or the input does not match the model's features"}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inlined_schema(BatchPredictionCreate)},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": FORM_FIELDS}},
    }}},
)
async def create_batch_prediction(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    refuse_declared_oversize(request, settings.max_upload_bytes)
    scope = "POST /v1/batch-predictions"
    if content_type.startswith("multipart/form-data"):
        options, content, filename, id_column = await _read_form(request, settings)
        return await run_in_threadpool(
            create_once, settings, idempotency_key, tenant=tenant, scope=scope, status_code=202,
            fingerprint=fingerprint(b"upload", canonical(options.model_dump(mode="json")), filename.encode(),
                                    (id_column or "").encode(), content),
            create=lambda: batch_predictions.create(session, settings, options, tenant, upload=content,
                                                    filename=filename, id_column=id_column),
        )
    if not content_type.startswith("application/json"):
        raise InvalidInput(
            "send JSON (over a dataset) or multipart/form-data (a CSV upload)",
            errors=[{"loc": ["header", "content-type"], "msg": f"unsupported: {content_type[:100] or 'none'}",
                     "type": "content_type"}],
        )
    body = await request.body()
    if len(body) > MAX_JSON_BODY:
        raise PayloadTooLarge(f"a JSON batch prediction request is at most {MAX_JSON_BODY // 1024} KiB")
    try:
        data = BatchPredictionCreate.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInput("the request body is not valid", errors=_body_errors(exc)) from None
    return await run_in_threadpool(
        create_once, settings, idempotency_key, tenant=tenant, scope=scope, status_code=202,
        fingerprint=fingerprint(b"dataset", canonical(data.model_dump(mode="json"))),
        create=lambda: batch_predictions.create(session, settings, data, tenant, dataset_id=data.dataset_id),
    )


@router.get("", response_model=BatchPredictionList)
def list_batch_predictions(
    session: SessionDep, tenant: CurrentTenant, page: PageDep, status: RunStatusName | None = None,
    model_run_id: Annotated[uuid.UUID | None, Query(description="only jobs predicting with this run")] = None,
) -> BatchPredictionList:
    """The caller's batch predictions, a page at a time (newest first unless `sort=created_at`)."""
    result = batch_predictions.list_page(session, tenant, page, status=status, model_run_id=model_run_id)
    return BatchPredictionList(items=result.items, next_cursor=result.next_cursor)


@router.get("/{job_id}", response_model=BatchPredictionRead, responses={404: {"description": "no such batch prediction"}})
def read_batch_prediction(job_id: uuid.UUID, session: SessionDep, tenant: CurrentTenant) -> BatchPredictionRead:
    """Status and progress (rows_done / rows_total); live events at GET /v1/runs/{id}/events."""
    return batch_predictions.read(session, job_id, tenant)


@router.post(
    "/{job_id}/cancel", response_model=BatchPredictionRead,
    responses={200: {"description": "cancelled (it was queued)"},
               202: {"description": "cancellation requested: the worker stops after its current chunk"},
               404: {"description": "no such batch prediction"}, 409: {"description": "it already ended"}},
)
def cancel_batch_prediction(
    job_id: uuid.UUID, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant, response: Response,
) -> BatchPredictionRead:
    body, done = batch_predictions.cancel(session, settings, job_id, tenant)
    response.status_code = 200 if done else 202
    return body


@router.get(
    "/{job_id}/results",
    response_class=StreamingResponse,
    responses={
        200: {"description": "the results: `row`, the input's `id` and `target` when present, then the "
                             "uncertainty columns", "content": {"text/csv": {}, "application/vnd.apache.parquet": {}}},
        404: {"description": "no such batch prediction"},
        409: {"description": "not finished (or it failed or was cancelled)"},
    },
)
def read_batch_prediction_results(
    job_id: uuid.UUID, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant,
    format: Annotated[ResultFormat, Query(description="csv or parquet")] = "csv",  # noqa: A002 (the query name)
) -> StreamingResponse:
    """Download the results, streamed chunk by chunk (409 until the job has succeeded)."""
    download = batch_predictions.results(settings, session, job_id, tenant, format)
    return StreamingResponse(
        download.chunks, media_type=download.media_type,
        headers={"Content-Disposition": f'attachment; filename="{download.filename}"'},
    )

