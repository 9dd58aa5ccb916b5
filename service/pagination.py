"""Keyset (cursor) pagination for list endpoints: stable under inserts, no OFFSET scans.

A cursor is opaque to callers: base64url of the sort key and the last row's (value, id).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from service.errors import InvalidInput

T = TypeVar("T")

SORT_KEYS = ("created_at", "-created_at")


@dataclass(frozen=True)
class PageQuery:
    limit: int = 100
    cursor: str | None = None
    sort: str = "-created_at"  # a column name, "-" for descending
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def _bad_cursor(why: str) -> InvalidInput:
    return InvalidInput(
        f"the cursor is not valid ({why}); pass the next_cursor of a previous page unchanged, with the same sort",
        errors=[{"loc": ["query", "cursor"], "msg": why, "type": "value_error"}],
    )


def encode_cursor(sort: str, value: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps({"s": sort, "v": value.isoformat(), "id": str(row_id)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        if data.get("s") != sort:
            raise _bad_cursor(f"it was made for sort={data.get('s')!r}, not {sort!r}")
        return datetime.fromisoformat(data["v"]), uuid.UUID(data["id"])
    except InvalidInput:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise _bad_cursor("undecodable") from exc


def paginate(session: Session, query: Select[Any], model: Any, page: PageQuery) -> tuple[list[Any], str | None]:
    """Rows of ``query`` (selecting ``model``) for one page, and the cursor of the next (or None)."""
    if page.sort not in SORT_KEYS:
        raise InvalidInput(
            f"sort must be one of {', '.join(SORT_KEYS)}",
            errors=[{"loc": ["query", "sort"], "msg": f"unknown sort {page.sort!r}", "type": "enum"}],
        )
    column = getattr(model, page.sort.lstrip("-"))
    descending = page.sort.startswith("-")
    if page.created_after is not None:
        query = query.where(model.created_at >= page.created_after)
    if page.created_before is not None:
        query = query.where(model.created_at < page.created_before)
    if page.cursor is not None:
        value, row_id = decode_cursor(page.cursor, page.sort)
        if descending:
            query = query.where(or_(column < value, and_(column == value, model.id < row_id)))
        else:
            query = query.where(or_(column > value, and_(column == value, model.id > row_id)))
    order = (column.desc(), model.id.desc()) if descending else (column.asc(), model.id.asc())
    rows = list(session.scalars(query.order_by(*order).limit(page.limit + 1)))
    if len(rows) <= page.limit:
        return rows, None
    rows = rows[: page.limit]
    last = rows[-1]
    return rows, encode_cursor(page.sort, getattr(last, page.sort.lstrip("-")), last.id)
