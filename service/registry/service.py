"""Model registry use cases: register versions, move gated aliases, resolve a name to a run.

A registered model belongs to one tenant and has a name unique within it. Its versions are
numbered 1, 2, ... and each points at a succeeded training run of the same tenant (immutable:
a succeeded run never changes). Aliases (``production``, ``staging``, any lower-case name) point
at one version each and move with one call; an alias may carry gate conditions on the stored
evaluation of the version it is moved to, and a move that fails them is refused (409).
"""

from __future__ import annotations

import logging
import math
import operator
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import Conflict, InvalidInput, InvalidState, NotFound
from service.pagination import Page, PageQuery, paginate
from service.registry.models import ModelAliasRow, ModelVersionRow, RegisteredModelRow
from service.registry.schemas import (
    DEFAULT_ALIAS,
    AliasRead,
    GateCondition,
    ModelVersionCreate,
    ModelVersionRead,
    RegisteredModelRead,
)
from service.runs import repository as runs_repository
from service.runs.models import RunRow, RunStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


@dataclass(frozen=True)
class Target:
    """What a name and an alias or version resolve to."""

    run_id: uuid.UUID
    version: int


def _not_found(detail: str) -> NotFound:
    """NotFound whose detail is the whole sentence ``detail`` (not "<kind> <id> does not exist")."""
    error = NotFound("model", detail)
    error.detail, error.args = detail, (detail,)
    return error


def _retrying(session: Session, change: Callable[[], T]) -> T:
    """``change()`` (which commits), again after a unique-constraint race with a concurrent
    request (the other request's row is then visible); Conflict if it keeps losing."""
    for _ in range(4):
        try:
            return change()
        except IntegrityError:
            session.rollback()
    raise Conflict("the model is being changed concurrently; try again")


def _model_row(session: Session, tenant_id: str, name: str) -> RegisteredModelRow:
    row = session.scalar(
        select(RegisteredModelRow).where(RegisteredModelRow.tenant_id == tenant_id, RegisteredModelRow.name == name)
    )
    if row is None:
        raise _not_found(f"model {name!r} does not exist")
    return row


def resolve_target(
    session: Session, tenant_id: str, name: str, alias: str | None = None, version: int | None = None,
) -> Target:
    """The run (and version number) that ``name`` at ``alias`` or ``version`` serves; with
    neither, the ``production`` alias. NotFound for another tenant's model, as for none."""
    if alias is not None and version is not None:
        raise InvalidInput(
            "give either alias or version, not both",
            errors=[{"loc": ["query", "version"], "msg": "alias is given too", "type": "value_error"}],
        )
    model = _model_row(session, tenant_id, name)
    if version is not None:
        run_id = session.scalar(
            select(ModelVersionRow.run_id).where(ModelVersionRow.model_id == model.id, ModelVersionRow.version == version)
        )
        if run_id is None:
            raise _not_found(f"model {name!r} has no version {version}")
        return Target(run_id, version)
    alias = alias or DEFAULT_ALIAS
    found = session.execute(
        select(ModelAliasRow.version_id, ModelVersionRow.run_id, ModelVersionRow.version)
        .outerjoin(ModelVersionRow, ModelVersionRow.id == ModelAliasRow.version_id)
        .where(ModelAliasRow.model_id == model.id, ModelAliasRow.alias == alias)
    ).first()
    if found is None:
        raise _not_found(f"model {name!r} has no alias {alias!r}" + (
            " (the default when neither alias nor version is given)" if alias == DEFAULT_ALIAS else ""))
    if found.version_id is None:
        raise _not_found(f"alias {alias!r} of model {name!r} points at no version yet (only its gates are set)")
    return Target(found.run_id, found.version)


def resolve(
    session: Session, tenant_id: str, name: str, alias: str | None = None, version: int | None = None,
) -> uuid.UUID:
    """The run id that ``name`` at ``alias`` or ``version`` serves (default: alias
    ``production``). Raises NotFound, with a message that says what is missing, when the model,
    version or alias does not exist for this tenant; InvalidInput when both are given."""
    return resolve_target(session, tenant_id, name, alias, version).run_id


# -- reads ----------------------------------------------------------------------------------
def _alias_reads(session: Session, model_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[AliasRead]]:
    if not model_ids:
        return {}
    rows = session.execute(
        select(ModelAliasRow, ModelVersionRow.version, ModelVersionRow.run_id)
        .outerjoin(ModelVersionRow, ModelVersionRow.id == ModelAliasRow.version_id)
        .where(ModelAliasRow.model_id.in_(model_ids))
        .order_by(ModelAliasRow.alias)
    ).all()
    reads: dict[uuid.UUID, list[AliasRead]] = {model_id: [] for model_id in model_ids}
    for row, version, run_id in rows:
        reads[row.model_id].append(_alias_read(row, version, run_id))
    return reads


def _alias_read(row: ModelAliasRow, version: int | None, run_id: uuid.UUID | None) -> AliasRead:
    return AliasRead(
        alias=row.alias, version=version, run_id=run_id,
        gates=[GateCondition.model_validate(gate) for gate in row.gates],
        generation=row.generation, updated_at=row.updated_at,
    )


def _latest_versions(session: Session, model_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    if not model_ids:
        return {}
    rows = session.execute(
        select(ModelVersionRow.model_id, func.max(ModelVersionRow.version))
        .where(ModelVersionRow.model_id.in_(model_ids)).group_by(ModelVersionRow.model_id)
    ).all()
    return {model_id: latest for model_id, latest in rows}


def _model_reads(session: Session, rows: list[RegisteredModelRow]) -> list[RegisteredModelRead]:
    ids = [row.id for row in rows]
    aliases, latest = _alias_reads(session, ids), _latest_versions(session, ids)
    return [
        RegisteredModelRead(
            name=row.name, latest_version=latest.get(row.id), aliases=aliases.get(row.id, []),
            created_at=row.created_at, updated_at=row.updated_at,
        )
        for row in rows
    ]


def read_model(session: Session, tenant_id: str, name: str) -> RegisteredModelRead:
    return _model_reads(session, [_model_row(session, tenant_id, name)])[0]


def list_models(session: Session, tenant_id: str, page: PageQuery) -> Page[RegisteredModelRead]:
    query = select(RegisteredModelRow).where(RegisteredModelRow.tenant_id == tenant_id)
    rows, next_cursor = paginate(session, query, RegisteredModelRow, page)
    return Page(_model_reads(session, rows), next_cursor)


def _version_reads(session: Session, model: RegisteredModelRow, rows: list[ModelVersionRow]) -> list[ModelVersionRead]:
    by_version: dict[uuid.UUID, list[str]] = {}
    for alias, version_id in session.execute(
        select(ModelAliasRow.alias, ModelAliasRow.version_id)
        .where(ModelAliasRow.model_id == model.id, ModelAliasRow.version_id.is_not(None))
        .order_by(ModelAliasRow.alias)
    ):
        by_version.setdefault(version_id, []).append(alias)
    return [
        ModelVersionRead(name=model.name, version=row.version, run_id=row.run_id,
                         aliases=by_version.get(row.id, []), created_at=row.created_at)
        for row in rows
    ]


def list_versions(session: Session, tenant_id: str, name: str, page: PageQuery) -> Page[ModelVersionRead]:
    model = _model_row(session, tenant_id, name)
    query = select(ModelVersionRow).where(ModelVersionRow.model_id == model.id)
    rows, next_cursor = paginate(session, query, ModelVersionRow, page)
    return Page(_version_reads(session, model, rows), next_cursor)


# -- registering versions -------------------------------------------------------------------
def _registrable_run(session: Session, tenant_id: str, run_id: uuid.UUID) -> RunRow:
    run = runs_repository.get(session, run_id)
    if run is None or run.tenant_id != tenant_id:
        raise InvalidInput(
            f"run {run_id} does not exist",
            errors=[{"loc": ["body", "run_id"], "msg": "no such run", "type": "not_found"}],
        )
    if run.kind != "train":
        raise InvalidInput(
            f"run {run_id} is a {run.kind} job, not a training run; only training runs have a servable model",
            errors=[{"loc": ["body", "run_id"], "msg": f"a {run.kind} job", "type": "value_error"}],
        )
    if run.status != RunStatus.SUCCEEDED:
        raise InvalidState(f"run {run_id} is {run.status}; only a succeeded run can be registered")
    return run


def register_version(session: Session, tenant_id: str, data: ModelVersionCreate) -> ModelVersionRead:
    """The next version of ``data.name`` (created on first use) pointing at ``data.run_id``.

    A run already registered under this name is a 409 that names its version (so a retried
    request cannot make a duplicate). Concurrent registrations are serialised by the unique
    constraints: the loser retries with the next number."""
    _registrable_run(session, tenant_id, data.run_id)

    def register() -> ModelVersionRead:
        model = session.scalar(
            select(RegisteredModelRow).where(RegisteredModelRow.tenant_id == tenant_id, RegisteredModelRow.name == data.name)
        )
        if model is None:
            model = RegisteredModelRow(tenant_id=tenant_id, name=data.name)
            session.add(model)
            session.flush()
        existing = session.scalar(
            select(ModelVersionRow.version).where(ModelVersionRow.model_id == model.id, ModelVersionRow.run_id == data.run_id)
        )
        if existing is not None:
            raise Conflict(f"run {data.run_id} is already version {existing} of model {data.name!r}")
        latest = session.scalar(select(func.max(ModelVersionRow.version)).where(ModelVersionRow.model_id == model.id))
        row = ModelVersionRow(model_id=model.id, version=(latest or 0) + 1, run_id=data.run_id)
        session.add(row)
        model.updated_at = utcnow()
        session.commit()
        return _version_reads(session, model, [row])[0]

    return _retrying(session, register)


# -- aliases and gates ----------------------------------------------------------------------
def metric_value(evaluation: dict[str, Any] | None, metric: str) -> tuple[float | None, str | None]:
    """The number at the dotted path ``metric`` of an evaluation report, or (None, why not)."""
    if evaluation is None:
        return None, "the version's run has no stored evaluation (it had no held-out rows)"
    value: Any = evaluation
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None, f"{metric} is missing from the evaluation"
        value = value[part]
    if value is None:
        return None, f"{metric} is undefined (null) in the evaluation"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"{metric} is not a number in the evaluation"
    return float(value), None


def failed_conditions(evaluation: dict[str, Any] | None, conditions: list[GateCondition]) -> list[dict[str, Any]]:
    """Each condition that ``evaluation`` fails, with the actual value and why (a missing or
    undefined metric fails too)."""
    failed = []
    for index, condition in enumerate(conditions):
        actual, missing = metric_value(evaluation, condition.metric)
        if missing is None and actual is not None and OPERATORS[condition.op](actual, condition.value):
            continue
        failed.append({
            "loc": ["gates", index], "metric": condition.metric, "op": condition.op, "value": condition.value,
            "actual": actual, "type": "gate_failed",
            "msg": missing or f"{condition.metric} = {actual:.6g} is not {condition.op} {condition.value:g}",
        })
    return failed


def _stored_evaluation(session: Session, run_id: uuid.UUID) -> dict[str, Any] | None:
    stored = runs_repository.results(session, run_id)
    return stored.data.get("evaluation") if stored is not None else None


def _alias_row(session: Session, model: RegisteredModelRow, alias: str, *, lock: bool = False) -> ModelAliasRow | None:
    query = select(ModelAliasRow).where(ModelAliasRow.model_id == model.id, ModelAliasRow.alias == alias)
    return session.scalar(query.with_for_update() if lock else query)


def _alias_for_update(session: Session, model: RegisteredModelRow, alias: str) -> ModelAliasRow:
    """The alias row, locked; a new one (pointing nowhere, no gates) if there is none. Two
    requests creating the same alias at once: one insert fails at commit and ``_retrying``
    runs that request again, finding the row."""
    row = _alias_row(session, model, alias, lock=True)
    if row is None:
        row = ModelAliasRow(model_id=model.id, alias=alias, version_id=None, gates=[], generation=0)
        session.add(row)
        session.flush()
    return row


def _version_of(session: Session, row: ModelAliasRow) -> tuple[int | None, uuid.UUID | None]:
    if row.version_id is None:
        return None, None
    found = session.execute(
        select(ModelVersionRow.version, ModelVersionRow.run_id).where(ModelVersionRow.id == row.version_id)
    ).one()
    return found.version, found.run_id


def move_alias(session: Session, tenant_id: str, name: str, alias: str, version: int) -> AliasRead:
    """Point ``alias`` (created if new) at ``version``, if that version's stored evaluation
    passes the alias's gates; otherwise Conflict (409) listing every failing condition."""
    def move() -> AliasRead:
        model = _model_row(session, tenant_id, name)
        target = session.scalar(
            select(ModelVersionRow).where(ModelVersionRow.model_id == model.id, ModelVersionRow.version == version)
        )
        if target is None:
            raise _not_found(f"model {name!r} has no version {version}")
        row = _alias_for_update(session, model, alias)
        conditions = [GateCondition.model_validate(gate) for gate in row.gates]
        if conditions:
            failed = failed_conditions(_stored_evaluation(session, target.run_id), conditions)
            if failed:
                session.rollback()
                raise Conflict(
                    f"version {version} of model {name!r} fails {len(failed)} of the {len(conditions)} gate "
                    f"condition(s) of alias {alias!r}: " + "; ".join(item["msg"] for item in failed),
                    errors=failed,
                )
        if row.version_id != target.id:
            row.version_id = target.id
            row.generation += 1
            row.updated_at = model.updated_at = utcnow()
        session.commit()
        log.info("alias %r of model %r (tenant %s) -> version %d (run %s)", alias, name, tenant_id, version, target.run_id)
        return _alias_read(row, version, target.run_id)

    return _retrying(session, move)


def set_gates(session: Session, tenant_id: str, name: str, alias: str, conditions: list[GateCondition]) -> AliasRead:
    """Replace the alias's gate conditions (the alias is created, pointing nowhere, if new).
    Gates are checked on moves; the version the alias points at now is not re-checked."""
    def update() -> AliasRead:
        model = _model_row(session, tenant_id, name)
        row = _alias_for_update(session, model, alias)
        row.gates = [condition.model_dump(mode="json") for condition in conditions]
        row.updated_at = utcnow()
        session.commit()
        version, run_id = _version_of(session, row)
        return _alias_read(row, version, run_id)

    return _retrying(session, update)


def delete_alias(session: Session, tenant_id: str, name: str, alias: str) -> None:
    model = _model_row(session, tenant_id, name)
    row = _alias_row(session, model, alias, lock=True)
    if row is None:
        raise _not_found(f"model {name!r} has no alias {alias!r}")
    session.delete(row)
    model.updated_at = utcnow()
    session.commit()


# -- what the serving replicas follow ---------------------------------------------------------
@dataclass(frozen=True)
class AliasTarget:
    tenant_id: str
    name: str
    alias: str
    run_id: uuid.UUID
    version: int
    generation: int


def alias_signature(session: Session) -> tuple[Any, ...]:
    """Changes whenever an alias is created, moved, re-gated or deleted (cheap to poll)."""
    count, generations, updated = session.execute(
        select(func.count(ModelAliasRow.id), func.coalesce(func.sum(ModelAliasRow.generation), 0),
               func.max(ModelAliasRow.updated_at))
    ).one()
    return int(count), int(generations), updated


def alias_targets(session: Session) -> list[AliasTarget]:
    """Every alias that points at a version, most recently moved first."""
    rows = session.execute(
        select(RegisteredModelRow.tenant_id, RegisteredModelRow.name, ModelAliasRow.alias, ModelVersionRow.run_id,
               ModelVersionRow.version, ModelAliasRow.generation)
        .join(ModelAliasRow, ModelAliasRow.model_id == RegisteredModelRow.id)
        .join(ModelVersionRow, ModelVersionRow.id == ModelAliasRow.version_id)
        .order_by(ModelAliasRow.updated_at.desc(), ModelAliasRow.id)
    ).all()
    return [AliasTarget(*row) for row in rows]
