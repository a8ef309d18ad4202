"""A registry in its own uvicorn process (SQLite + file store), configured through CKREG_* like
``ckreg serve`` and with its uvicorn options, for tests that need a real server under load."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.services import free_port

SERVE = """
import uvicorn
from registry.api.app import create_app, server_options
from registry.settings import get_settings
settings = get_settings()
uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
            **server_options(settings))
"""


@dataclass(frozen=True)
class ServerProcess:
    url: str
    tokens: list[str]
    home: Path
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def _make_tokens(database_url: str, count: int) -> list[str]:
    from sqlmodel import Session

    from registry.db import make_engine, upgrade_database
    from registry.services.tokens import create_token

    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return [
                create_token(session=session, name=f"writer-{i}", scopes=["write"])[1]
                for i in range(count)
            ]
    finally:
        engine.dispose()


@contextmanager
def registry_process(
    home: Path, *, tokens: int = 1, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """Start the server, wait for ``/healthz``, yield it, and stop it (SIGTERM, then kill)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings_env = {
        "CKREG_HOME": str(home),
        "CKREG_DATABASE_URL": f"sqlite:///{home / 'registry.db'}",
        "CKREG_STORE_URL": f"file://{home / 'store'}",
        "CKREG_HOST": "127.0.0.1",
        "CKREG_PORT": str(port),
        "CKREG_TASK_VECTORS_ON_COMPLETE": "false",
        **(env or {}),
    }
    secrets = _make_tokens(settings_env["CKREG_DATABASE_URL"], tokens)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE],
            env={**os.environ, **settings_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"registry process exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry process did not answer on {url}")
            time.sleep(0.1)
        yield ServerProcess(url=url, tokens=secrets, home=home, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
