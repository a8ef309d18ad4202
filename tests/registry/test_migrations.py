"""Alembic migrations: a fresh SQLite and a fresh PostgreSQL database upgrade to head, the result
matches the models exactly, and downgrade/upgrade round-trips."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlmodel import SQLModel

from registry.db import alembic_config, current_revision, make_engine, upgrade_database

TABLES = {
    "checkpoint",
    "checkpointtag",
    "artifact",
    "metric",
    "mergepolicy",
    "mergerun",
    "mergeruninput",
    "lineage",
    "apitoken",
}


def test_upgrade_fresh_database_matches_models(database_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert current_revision(database_url) is None
    upgrade_database(database_url)
    upgrade_database(database_url)  # idempotent
    assert current_revision(database_url) == head
    engine = make_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, SQLModel.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(database_url: str) -> None:
    from alembic import command

    upgrade_database(database_url)
    command.downgrade(alembic_config(database_url), "base")
    engine = make_engine(database_url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    upgrade_database(database_url)
    assert current_revision(database_url) is not None
