"""Alembic environment. The URL comes from the Alembic config (set by service.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

import service.models  # noqa: F401  (registers every table on Base.metadata)
from service.db import Base, get_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    connectable = get_engine(url) if url.startswith("sqlite") else None
    if connectable is None:
        from sqlalchemy import create_engine

        connectable = create_engine(url, poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite needs batch mode for ALTER
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
