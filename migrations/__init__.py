"""Alembic migrations for the registry database (see registry.db.upgrade_database)."""
