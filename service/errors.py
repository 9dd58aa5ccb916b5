"""Domain errors. No HTTP here: service/api/errors.py maps them to problem+json in one place."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class; ``detail`` is shown to the caller, ``errors`` lists what was wrong and where."""

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class NotFound(DomainError):
    def __init__(self, kind: str, identifier: object) -> None:
        super().__init__(f"{kind} {identifier} does not exist")
        self.kind = kind
        self.identifier = identifier


class Unauthenticated(DomainError):
    """No valid API key: 401 with ``WWW-Authenticate: Bearer``."""


class Conflict(DomainError):
    """The request is valid but clashes with the current state of the resource."""


class InvalidState(Conflict):
    """An operation needs the resource in another state (e.g. predicting before training ended)."""


class InvalidInput(DomainError):
    """Semantically invalid input that only the domain can judge (bad CSV, wrong feature count)."""


class PayloadTooLarge(DomainError):
    pass


class Unavailable(DomainError):
    """A backing service (database, broker) cannot be reached; worth retrying later."""
