"""Alembic migrations: apply on SQLite and PostgreSQL, match the ORM models, downgrade cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect

from service.db import Base, get_engine
from service.migrate import alembic_config, upgrade
from tests.conftest import _pg_url, create_database, drop_database


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.sqlite3'}"
        return
    name = create_database()
    yield _pg_url(name)
    drop_database(name)


def test_upgrade_matches_models_and_downgrades(empty_database: str) -> None:
    import service.models  # noqa: F401

    upgrade(empty_database)
    tables = set(inspect(get_engine(empty_database)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    command.check(alembic_config(empty_database))  # raises if the models and migrations differ
    command.downgrade(alembic_config(empty_database), "base")
    get_engine.cache_clear()
    assert set(inspect(get_engine(empty_database)).get_table_names()) <= {"alembic_version"}
    upgrade(empty_database)  # and up again
