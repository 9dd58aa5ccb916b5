"""/v1/datasets: built-in sets by JSON, CSV files by multipart upload."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from pydantic import ValidationError

from service.api.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, ValidDataset
from service.api.uploads import read_limited, refuse_declared_oversize
from service.api.idempotency import IdempotencyKey, canonical, create_once
from service.jobs.idempotency import fingerprint
from service.datasets import service as datasets
from service.datasets.schemas import DatasetCreate, DatasetList, DatasetRead
from service.errors import InvalidInput, PayloadTooLarge

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

CSV_FORM_DOC = (
    "Either a JSON body `{\"name\": ..., \"builtin\": \"digits\"}` or a multipart form with "
    "`file` (CSV with a header row), `name`, `target` (the target column's name) and `task` "
    "(`classification` or `regression`)."
)


@router.post(
    "",
    status_code=201,
    response_model=DatasetRead,
    description=CSV_FORM_DOC,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": DatasetCreate.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "name", "target", "task"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string"},
                            "target": {"type": "string"},
                            "task": {"type": "string", "enum": ["classification", "regression"]},
                        },
                    }
                },
            },
            "required": True,
        }
    },
)
async def create_dataset(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: CurrentTenant,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    refuse_declared_oversize(request, settings.max_upload_bytes)
    if content_type.startswith("multipart/form-data"):
        name, target, task, content = await _read_form(request, settings)
        return await run_in_threadpool(
            create_once, settings, idempotency_key, tenant=tenant, scope="POST /v1/datasets", status_code=201,
            fingerprint=fingerprint(b"csv", name.encode(), target.encode(), task.encode(), content),
            create=lambda: datasets.create_from_csv(
                session, settings, name=name, target=target, task=task, content=content, tenant_id=tenant,
            ),
        )
    if not content_type.startswith("application/json"):
        raise InvalidInput(
            "send JSON (a built-in dataset) or multipart/form-data (a CSV upload)",
            errors=[{"loc": ["header", "content-type"], "msg": f"unsupported: {content_type or 'none'}", "type": "content_type"}],
        )
    body = await request.body()
    if len(body) > 64 * 1024:
        raise PayloadTooLarge("a JSON dataset request is at most 64 KiB")
    try:
        data = DatasetCreate.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidInput(
            "the request body is not valid",
            errors=[{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()],
        ) from None
    return await run_in_threadpool(
        create_once, settings, idempotency_key, tenant=tenant, scope="POST /v1/datasets", status_code=201,
        fingerprint=fingerprint(b"builtin", canonical(data.model_dump(mode="json"))),
        create=lambda: datasets.create_builtin(session, data, tenant),
    )


async def _read_form(request: Request, settings: SettingsDep) -> tuple[str, str, str, bytes]:
    form = await request.form(max_files=1, max_fields=10, max_part_size=settings.max_upload_bytes)
    errors = []
    for field in ("file", "name", "target", "task"):
        if field not in form:
            errors.append({"loc": ["body", field], "msg": "field required", "type": "missing"})
    if errors:
        raise InvalidInput("the upload form is missing fields", errors=errors)
    upload = form["file"]
    if not hasattr(upload, "read"):
        raise InvalidInput("`file` must be a file", errors=[{"loc": ["body", "file"], "msg": "not a file", "type": "file"}])
    task = str(form["task"])
    if task not in ("classification", "regression"):
        raise InvalidInput(
            "task must be classification or regression",
            errors=[{"loc": ["body", "task"], "msg": f"got {task!r}", "type": "literal_error"}],
        )
    name = str(form["name"]).strip()
    if not 1 <= len(name) <= 200:
        raise InvalidInput("name must have 1 to 200 characters", errors=[{"loc": ["body", "name"], "msg": "bad length", "type": "string"}])
    content = await read_limited(upload, settings.max_upload_bytes)  # type: ignore[arg-type]
    return name, str(form["target"]).strip(), task, content


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep, tenant: CurrentTenant, page: PageDep, task: Literal["classification", "regression"] | None = None,
) -> DatasetList:
    """The caller's datasets, a page at a time (newest first unless `sort=created_at`)."""
    result = datasets.list_page(session, tenant, page, task=task)
    return DatasetList(items=result.items, next_cursor=result.next_cursor)


@router.get("/{dataset_id}", response_model=DatasetRead, responses={404: {"description": "no such dataset"}})
def read_dataset(dataset: ValidDataset) -> DatasetRead:
    return DatasetRead.model_validate(dataset)
