"""A real registry server (uvicorn on a free port, SQLite + file store) for client and CLI tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class LiveRegistry:
    """Where the test server listens, with a write token and a read-only token."""

    url: str
    token: str
    read_token: str
    home: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tokens(database_url: str) -> tuple[str, str]:
    from sqlmodel import Session

    from registry.db import make_engine
    from registry.services.tokens import create_token

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            _, write = create_token(session=session, name="tests-write", scopes=["write"])
            _, read = create_token(session=session, name="tests-read", scopes=["read"])
    finally:
        engine.dispose()
    return write, read


@pytest.fixture(scope="module")
def live_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRegistry]:
    """Serve ``create_app`` in a background thread for the module; stopped afterwards."""
    import uvicorn

    from registry.api.app import create_app
    from registry.db import upgrade_database
    from registry.settings import Settings

    home = tmp_path_factory.mktemp("registry-home")
    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'registry.db'}",
        store_url=f"file://{home / 'store'}",
        scan_nonfinite=True,
    )
    upgrade_database(settings.database_url)
    write, read = _tokens(settings.database_url)
    port = _free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ckreg-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"test registry server did not start on port {port}")
        time.sleep(0.05)
    yield LiveRegistry(url=f"http://127.0.0.1:{port}", token=write, read_token=read, home=home)
    server.should_exit = True
    thread.join(timeout=10)
