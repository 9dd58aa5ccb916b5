"""A leaner request handler for hot JSON endpoints (POST /v1/runs/{run_id}/predict).

FastAPI's generic handler solves a dependency graph for every request: per parameter it looks
up caches, checks scopes, builds a query-params multidict, parses the body with ``json.loads``
and validates the resulting dict with pydantic. For a predict request answered from a cached
model that machinery costs more CPU than everything else on the event loop (profiled: ~30 %
of the loop's time per request), and the event loop's CPU is what bounds a single API process.

``JsonBodyRoute`` keeps the endpoint function as the single description of the route (FastAPI
still builds its OpenAPI operation, and the route is matched, wrapped and its errors mapped as
any other), but handles requests itself when the endpoint takes only

- path parameters (validated with the parameter's type, as FastAPI does),
- one pydantic model as the JSON body (validated with ``model_validate_json``: one pass of
  pydantic-core's parser over the bytes instead of ``json.loads`` and a validation),
- the ``Request``, and
- ``CurrentTenant`` (the same function as the dependency, called directly),

and returns a ``Response``. Anything else falls back to FastAPI's own handler. The answers are
the same as FastAPI's, errors included: 401 before anything else; 422 with FastAPI's error
list (``loc`` starting with "path" or "body") for a bad path parameter, a body that is missing,
not JSON by its content type, malformed (FastAPI's "JSON decode error" and position) or
invalid. tests/api/test_fast_routes.py compares the two handlers on such requests.
"""

from __future__ import annotations

import email.message
import functools
import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

from service.api.deps import CurrentTenant, tenant_of_request


@functools.lru_cache(maxsize=64)
def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule (strict content type): application/json or application/*+json (a header
    value parsed once, then remembered: clients send the same few values)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _from_json(model: type[BaseModel], raw: bytes) -> BaseModel:
    """``model`` from JSON bytes; where pydantic's parser refuses the bytes, what FastAPI does:
    ``json.loads`` (its decode error as FastAPI reports it), then validation of the result."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if not any(error["type"] == "json_invalid" for error in exc.errors(include_url=False)):
            raise
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as decode:  # FastAPI's error for malformed JSON
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", decode.pos), "msg": "JSON decode error", "input": {},
              "ctx": {"error": decode.msg}}],
            body=decode.doc,
        ) from None
    except ValueError:  # not text at all (UnicodeDecodeError): FastAPI's answer is a 400
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from None
    return model.model_validate(parsed, from_attributes=True)


class _Plan:
    """What the endpoint takes, by parameter name."""

    def __init__(self, endpoint: Callable[..., Any], path_names: set[str]) -> None:
        self.ok = inspect.iscoroutinefunction(endpoint)
        hints = get_type_hints(endpoint, include_extras=True)
        self.path: dict[str, TypeAdapter[Any]] = {}
        self.body: tuple[str, type[BaseModel]] | None = None
        self.request: str | None = None
        self.tenant: str | None = None
        returns = hints.get("return")
        self.ok = self.ok and inspect.isclass(returns) and issubclass(returns, Response)
        for name in inspect.signature(endpoint).parameters:
            hint = hints.get(name)
            if name in path_names and get_origin(hint) is not Annotated:
                self.path[name] = TypeAdapter(hint)
            elif hint is Request:
                self.request = name
            elif hint == CurrentTenant or (get_origin(hint) is Annotated and get_args(hint) == get_args(CurrentTenant)):
                self.tenant = name
            elif inspect.isclass(hint) and issubclass(hint, BaseModel) and self.body is None:
                self.body = (name, hint)
            else:
                self.ok = False
        self.ok = self.ok and self.body is not None and set(self.path) == path_names


class JsonBodyRoute(APIRoute):
    """An APIRoute whose requests skip FastAPI's dependency solving (see the module)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        plan = _Plan(self.endpoint, set(self.param_convertors))
        if not plan.ok:
            return super().get_route_handler()
        endpoint = self.endpoint
        assert plan.body is not None
        body_name, body_model = plan.body

        async def handle(request: Request) -> Response:
            # FastAPI's order: the body is read and JSON-decoded first (a decode error is a 422
            # at once), then dependencies (a missing key is a 401), then parameter and body errors.
            raw = await request.body()
            body: BaseModel | ValidationError | None = None
            if raw:
                try:
                    if _is_json(request.headers.get("content-type")):
                        body = _from_json(body_model, raw)
                    else:  # FastAPI validates the raw bytes against the model: a type error at "body"
                        body = body_model.model_validate(raw, from_attributes=True)
                except ValidationError as exc:
                    body = exc
            arguments: dict[str, Any] = {}
            if plan.tenant is not None:
                arguments[plan.tenant] = await tenant_of_request(request)
            if plan.request is not None:
                arguments[plan.request] = request
            errors: list[dict[str, Any]] = []
            for name, adapter in plan.path.items():
                try:
                    arguments[name] = adapter.validate_python(request.path_params[name])
                except ValidationError as exc:
                    errors += [{**error, "loc": ("path", name, *error["loc"])} for error in exc.errors(include_url=False)]
            if body is None:
                errors.append({"type": "missing", "loc": ("body",), "msg": "Field required", "input": None})
            elif isinstance(body, ValidationError):
                errors += [{**error, "loc": ("body", *error["loc"])} for error in body.errors(include_url=False)]
            else:
                arguments[body_name] = body
            if errors:
                raise RequestValidationError(errors, body=raw)
            return await endpoint(**arguments)

        return handle
