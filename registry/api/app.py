"""The registry's FastAPI application (``/api/v1``), built from settings and a launcher."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from registry.api.body_guard import InputGuard
from registry.api.docs import install_docs
from registry.api.errors import ERROR_RESPONSES, install_error_handlers
from registry.api.links import with_links
from registry.api.routes import (
    admin,
    artifacts,
    checkpoints,
    files,
    health,
    hub,
    merges,
    metrics,
    policies,
    searches,
    task_vectors,
    uploads,
)
from registry.api.uploading import UploadSlots
from registry.db import make_engine
from registry.launcher import Launcher, NullLauncher
from registry.settings import Settings
from registry.storage import ObjectStore, open_store

API_PREFIX = "/api/v1"


def open_settings_store(settings: Settings) -> ObjectStore:
    """The object store the settings name (S3 endpoint, region and part size included)."""
    return open_store(
        settings.store_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        part_size=settings.s3_part_size,
    )


def server_options(settings: Settings) -> dict[str, object]:
    """uvicorn options of ``ckreg serve``: idle keep-alive connections and oversized request
    heads are cut off, so idle or slow clients cannot pile up connections."""
    return {
        "timeout_keep_alive": settings.server_keep_alive_s,
        "h11_max_incomplete_event_size": 64 * 1024,
    }


def create_app(settings: Settings, *, launcher: Launcher | None = None) -> FastAPI:
    """The registry app; the database must already be upgraded (``registry.db.upgrade_database``)."""
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Move start-up objects (torch, SQLAlchemy, pydantic schemas: ~260k) out of the
        # collector's view: full collections re-scanning them cost ~150 ms of tail latency.
        gc.collect()
        gc.freeze()
        yield
        engine.dispose()

    app = FastAPI(
        title="ckreg registry",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # served offline by install_docs, with Swagger UI's files local
        redoc_url=None,
        responses=ERROR_RESPONSES,
    )
    app.openapi = with_links(app.openapi)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.engine = engine
    app.state.store = open_settings_store(settings)
    app.state.launcher = launcher or NullLauncher()
    app.state.upload_slots = UploadSlots.from_settings(settings)
    app.add_middleware(InputGuard, max_body_bytes=settings.max_json_body_bytes)
    install_error_handlers(app)
    install_docs(app, prefix=API_PREFIX)
    app.include_router(health.router)
    app.include_router(health.router, prefix=API_PREFIX)
    for module in (
        checkpoints,
        files,
        uploads,
        artifacts,
        metrics,
        task_vectors,
        policies,
        merges,
        searches,
    ):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(admin.router, prefix=API_PREFIX)
    app.include_router(hub.router)  # Hugging Face Hub-compatible reads under /hub
    return app
