"""/v2: the Open Inference Protocol (KServe V2, REST/JSON) over the model registry.

A V2 model name is a registered model's name; without a version in the path it serves the
alias in ``parameters.alias`` (default ``production``). The single input tensor ``input-0``
is ``FP32 [-1, n_features]``; the outputs are named tensors (see :func:`_output_columns`).
MC dropout options travel in the request's ``parameters``: ``samples`` (T), ``seed``.
Errors are V2-shaped, ``{"error": "..."}`` with a 4xx status (service/api/errors.py renders
every error under /v2 that way); Bearer API keys and tenants apply as on /v1.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import text

from service.api.deps import CurrentTenant, SettingsDep
from service.db import get_sessionmaker
from service.errors import InvalidInput
from service.registry.schemas import ALIAS_PATTERN, MODEL_NAME_PATTERN
from service.registry.service import Target
from service.registry.serving import ServingAliases, serving_model
from service.runs import service as runs
from service.runs.batching import app_batcher
from service.runs.modelling import TrainedModel
from service.runs.schemas import PredictRequest

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

INPUT_NAME = "input-0"
NUMERIC_DATATYPES = ("FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
CLASSIFICATION_OUTPUTS = ("probabilities", "probabilities_std", "predictive_entropy", "expected_entropy",
                          "mutual_information", "predicted_class", "label")
REGRESSION_OUTPUTS = ("mean", "std", "epistemic_std", "aleatoric_std", "lower", "upper")

ModelNamePath = Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1)]
V2_ERROR = {"description": 'V2 error: {"error": "..."}', "content": {"application/json": {"example": {"error": "..."}}}}
ERRORS = {400: V2_ERROR, 401: V2_ERROR, 404: V2_ERROR, 409: V2_ERROR, 422: V2_ERROR}


class V2Parameters(BaseModel):
    """Request parameters; unknown ones are ignored, as V2 servers do."""

    model_config = ConfigDict(extra="allow")

    samples: int = Field(default=100, ge=1, le=10_000, description="T, the number of stochastic passes")
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="same seed, same inputs: same outputs")
    alias: Annotated[str, Field(pattern=ALIAS_PATTERN)] | None = Field(
        default=None, description="without a version in the path: serve this alias (default production)")


class V2InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(min_length=1, max_length=8)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="row-major, flat or nested")


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "id": "42", "parameters": {"samples": 100, "seed": 7},
            "inputs": [{"name": INPUT_NAME, "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}],
        }]},
    )

    id: str | None = Field(default=None, max_length=256)
    parameters: V2Parameters = Field(default_factory=V2Parameters)
    inputs: list[V2InputTensor] = Field(min_length=1, max_length=1, description=f"one tensor, {INPUT_NAME}")
    outputs: list[V2RequestedOutput] | None = Field(default=None, max_length=16, description="default: all")


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[V2Tensor]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


def _bad(detail: str) -> InvalidInput:
    return InvalidInput(detail)


def _flatten(data: list[Any], depth_left: int = 8) -> list[Any]:
    flat: list[Any] = []
    for value in data:
        if isinstance(value, list):
            if depth_left == 0:
                raise _bad("input data nests too deeply")
            flat.extend(_flatten(value, depth_left - 1))
        else:
            flat.append(value)
    return flat


def _rows(tensor: V2InputTensor, n_features: int, max_rows: int) -> list[list[float]]:
    """The input tensor as rows of ``n_features`` finite numbers (checked against its shape)."""
    if tensor.datatype not in NUMERIC_DATATYPES:
        raise _bad(f"input {tensor.name!r} has datatype {tensor.datatype}; use FP32 (or another numeric type)")
    if tensor.parameters and tensor.parameters.get("binary_data_size") is not None:
        raise _bad("binary tensor data is not supported; send the data as JSON")
    if len(tensor.shape) != 2 or tensor.shape[1] != n_features:
        raise _bad(f"input {tensor.name!r} has shape {tensor.shape}; the model takes [N, {n_features}]")
    n_rows = tensor.shape[0]
    if n_rows == 0:
        raise _bad("the input has no rows")
    if n_rows > max_rows:
        raise _bad(f"at most {max_rows} rows per request, got {n_rows}")
    flat = _flatten(tensor.data)
    if len(flat) != n_rows * n_features:
        raise _bad(f"input {tensor.name!r} has {len(flat)} values; its shape {tensor.shape} needs {n_rows * n_features}")
    numbers = []
    for value in flat:
        number = math.nan
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond float64
                pass
        if not math.isfinite(number):
            raise _bad(f"input {tensor.name!r} holds {str(value)[:40]!r}; every value must be a finite number")
        numbers.append(number)
    return [numbers[i * n_features : (i + 1) * n_features] for i in range(n_rows)]


def _output_columns(model: TrainedModel, n_rows: int | None) -> list[V2Tensor]:
    """The named outputs of a model, with shapes for ``n_rows`` rows (-1: any)."""
    rows = -1 if n_rows is None else n_rows
    if model.task == "classification":
        classes = model.network.n_outputs
        return [
            V2Tensor(name="probabilities", datatype="FP64", shape=[rows, classes]),
            V2Tensor(name="probabilities_std", datatype="FP64", shape=[rows, classes]),
            *(V2Tensor(name=name, datatype="FP64", shape=[rows])
              for name in ("predictive_entropy", "expected_entropy", "mutual_information")),
            V2Tensor(name="predicted_class", datatype="INT64", shape=[rows]),
            V2Tensor(name="label", datatype="BYTES", shape=[rows]),
        ]
    return [V2Tensor(name=name, datatype="FP64", shape=[rows]) for name in REGRESSION_OUTPUTS]


def _output_data(task: str, predictions: list[Any]) -> dict[str, list[Any]]:
    if task == "classification":
        return {
            "probabilities": [p for row in predictions for p in row.probabilities],
            "probabilities_std": [p for row in predictions for p in row.probabilities_std],
            "predictive_entropy": [row.predictive_entropy for row in predictions],
            "expected_entropy": [row.expected_entropy for row in predictions],
            "mutual_information": [row.mutual_information for row in predictions],
            "predicted_class": [row.class_index for row in predictions],
            "label": [row.label for row in predictions],
        }
    return {
        "mean": [row.mean for row in predictions],
        "std": [row.std for row in predictions],
        "epistemic_std": [row.epistemic_std for row in predictions],
        "aleatoric_std": [row.aleatoric_std for row in predictions],
        "lower": [row.interval_95.lower for row in predictions],
        "upper": [row.interval_95.upper for row in predictions],
    }


async def _target_and_model(
    request: Request, tenant: str, name: str, alias: str | None, version: int | None,
) -> tuple[Target, TrainedModel]:
    state = request.app.state
    aliases: ServingAliases = state.model_aliases

    def load() -> tuple[Target, TrainedModel]:
        target = aliases.cached(tenant, name, alias, version) or aliases.resolve_in_own_session(tenant, name, alias, version)
        return target, serving_model(state.settings, state.model_cache, target.run_id, tenant)

    target = aliases.cached(tenant, name, alias, version)
    if target is not None:
        model = state.model_cache.peek(target.run_id)
        if model is not None and model.tenant_id == tenant:
            return target, model
    return await anyio.to_thread.run_sync(load)


# -- server ---------------------------------------------------------------------------------
@router.get("/health/live")
def read_live() -> dict[str, bool]:
    """The server is up."""
    return {"live": True}


@router.get("/health/ready", responses={503: V2_ERROR})
async def read_ready(settings: SettingsDep) -> JSONResponse:
    """Ready to serve inference: the database (where models are stored) answers."""

    def check() -> None:
        with get_sessionmaker(settings.sqlalchemy_url)() as session:
            session.execute(text("SELECT 1"))

    try:
        await anyio.to_thread.run_sync(check)
    except Exception as exc:
        return JSONResponse({"ready": False, "error": f"the database is unavailable: {type(exc).__name__}"},
                            status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"ready": True})


@router.get("")
def read_server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "mcdrop", "version": request.app.version, "extensions": []}


# -- models ---------------------------------------------------------------------------------
async def _metadata(request: Request, tenant: str, name: str, alias: str | None, version: int | None) -> V2ModelMetadata:
    target, model = await _target_and_model(request, tenant, name, alias, version)
    return V2ModelMetadata(
        name=name, versions=[str(target.version)], platform="mcdrop-mc-dropout",
        inputs=[V2Tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, model.network.n_inputs])],
        outputs=_output_columns(model, None),
    )


@router.get("/models/{name}", response_model=V2ModelMetadata, response_model_exclude_none=True, responses=ERRORS)
async def read_model_metadata(
    name: ModelNamePath, request: Request, tenant: CurrentTenant,
    alias: Annotated[str | None, Query(pattern=ALIAS_PATTERN)] = None,
) -> V2ModelMetadata:
    """The version at `alias` (default production): its input tensor and named outputs."""
    return await _metadata(request, tenant, name, alias, None)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, response_model_exclude_none=True,
            responses=ERRORS)
async def read_model_version_metadata(
    name: ModelNamePath, version: VersionPath, request: Request, tenant: CurrentTenant,
) -> V2ModelMetadata:
    return await _metadata(request, tenant, name, None, version)


@router.get("/models/{name}/ready", responses=ERRORS)
async def read_model_ready(
    name: ModelNamePath, request: Request, tenant: CurrentTenant,
    alias: Annotated[str | None, Query(pattern=ALIAS_PATTERN)] = None,
) -> dict[str, Any]:
    """200 when the model resolves and is loaded (this call loads it if needed); 4xx if not."""
    await _target_and_model(request, tenant, name, alias, None)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", responses=ERRORS)
async def read_model_version_ready(
    name: ModelNamePath, version: VersionPath, request: Request, tenant: CurrentTenant,
) -> dict[str, Any]:
    await _target_and_model(request, tenant, name, None, version)
    return {"name": name, "version": str(version), "ready": True}


async def _infer(request: Request, tenant: str, name: str, version: int | None, body: V2InferRequest) -> JSONResponse:
    state = request.app.state
    alias = body.parameters.alias if version is None else None
    target, model = await _target_and_model(request, tenant, name, alias, version)
    available = _output_columns(model, None)
    names = [tensor.name for tensor in available]
    wanted = [output.name for output in body.outputs] if body.outputs else names
    unknown = [output for output in wanted if output not in names]
    if unknown:
        raise _bad(f"unknown output {unknown[0]!r}; this model has {', '.join(names)}")
    rows = _rows(body.inputs[0], model.network.n_inputs, state.settings.max_predict_inputs)
    try:
        predict_request = PredictRequest(inputs=rows, samples=body.parameters.samples, seed=body.parameters.seed)
    except ValidationError as exc:
        raise _bad(f"invalid request: {exc.errors()[0]['msg']}") from None
    batcher = app_batcher(state, state.settings)
    predicted = await runs.predict(state.settings, state.model_cache, batcher, target.run_id, predict_request, tenant)
    data = _output_data(model.task, predicted.response().predictions)
    shapes = {tensor.name: tensor for tensor in _output_columns(model, len(rows))}
    response = V2InferResponse(
        model_name=name, model_version=str(target.version), id=body.id,
        parameters={"samples": predicted.samples, "seed": predicted.seed, "run_id": str(target.run_id),
                    "task": model.task},
        outputs=[V2Tensor(name=output, datatype=shapes[output].datatype, shape=shapes[output].shape, data=data[output])
                 for output in wanted],
    )
    return JSONResponse(response.model_dump(mode="json", exclude_none=True))


@router.post("/models/{name}/infer", response_model=V2InferResponse, responses=ERRORS)
async def infer(name: ModelNamePath, body: V2InferRequest, request: Request, tenant: CurrentTenant) -> JSONResponse:
    """MC dropout inference with the version at `parameters.alias` (default production):
    `parameters.samples` (T, default 100) and `parameters.seed`; the outputs are the mean and
    the uncertainty fields as named tensors (classification: probabilities, probabilities_std,
    predictive_entropy, expected_entropy, mutual_information, predicted_class, label;
    regression: mean, std, epistemic_std, aleatoric_std, lower, upper)."""
    return await _infer(request, tenant, name, None, body)


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=ERRORS)
async def infer_version(
    name: ModelNamePath, version: VersionPath, body: V2InferRequest, request: Request, tenant: CurrentTenant,
) -> JSONResponse:
    return await _infer(request, tenant, name, version, body)

