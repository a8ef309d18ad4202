"""What a flow run works with: settings, a database engine and the object store.

Flows take only ids as parameters (so Prefect deployments can start them); they reach the
database and store through the process-wide ``Runtime``. The embedded launcher configures it
with the server's settings; a Prefect worker process builds it from ``CKREG_*`` settings.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlmodel import Session

from registry.db import make_engine, session_scope
from registry.settings import Settings, get_settings
from registry.storage import ObjectStore, open_store


@dataclass
class Runtime:
    """Settings plus the engine and store built from them."""

    settings: Settings
    engine: Engine = field(init=False)
    store: ObjectStore = field(init=False)
    #: Where side work (MLflow logging) runs off the merge path; None runs it inline.
    background: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        self.engine = make_engine(self.settings.database_url)
        self.store = open_store(
            self.settings.store_url,
            endpoint_url=self.settings.s3_endpoint_url,
            region=self.settings.s3_region,
            part_size=self.settings.s3_part_size,
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A fresh database session (closed afterwards)."""
        with session_scope(self.engine) as session:
            yield session

    def close(self) -> None:
        if self.background is not None:
            self.background.shutdown(wait=True)
        self.engine.dispose()


_lock = threading.Lock()
_current: Runtime | None = None


def configure(settings: Settings) -> Runtime:
    """Make ``settings`` the runtime of this process's flows; returns the new runtime."""
    global _current
    with _lock:
        if _current is not None and _current.settings == settings:
            return _current
        if _current is not None:
            _current.close()
        _current = Runtime(settings)
        return _current


def current_runtime() -> Runtime:
    """The configured runtime, built from the environment's settings on first use."""
    with _lock:
        runtime = _current
    return runtime if runtime is not None else configure(get_settings())


def reset() -> None:
    """Forget the runtime (tests switch settings between cases)."""
    global _current
    with _lock:
        if _current is not None:
            _current.close()
        _current = None
