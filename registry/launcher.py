"""How the registry starts background work without importing ``flows``.

The app and services receive a ``Launcher``; flows provides the real one (in-process or Prefect
deployments), tests and bare servers use ``NullLauncher``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Launcher(Protocol):
    """Hooks the registry calls after committing state changes."""

    def checkpoint_ready(self, checkpoint_id: int) -> None:
        """A checkpoint completed validation and is ready (match on_register policies)."""
        ...

    def merge_requested(self, run_id: int) -> None:
        """A merge run was queued and should be executed."""
        ...

    def search_requested(self, search_id: int) -> None:
        """A merge search was queued (or re-queued to resume) and should be run."""
        ...


class NullLauncher:
    """Starts nothing; the default when no flows are plugged in."""

    def checkpoint_ready(self, checkpoint_id: int) -> None:
        return None

    def merge_requested(self, run_id: int) -> None:
        return None

    def search_requested(self, search_id: int) -> None:
        return None
