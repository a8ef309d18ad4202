"""One attempt of a merge run: the heartbeat that keeps its lease, and its staging folder.

Many workers may try the same run (a revived worker after its successor took over); each
attempt works in its own folder and gives up as soon as it notices it lost the lease.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from flows import outputs, processes
from flows.runtime import Runtime
from registry.services import leases
from registry.services import merge_runs as run_service

if TYPE_CHECKING:
    from flows.preparation import PreparedMerge

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews a lease every third of its length on a background thread while in the block.

    ``check()`` raises ``LeaseLost`` once a renewal found the lease taken over; ``held()``
    asks the database. A renewal that fails for another reason (database briefly away) is
    retried at the next beat; the lease then may expire, which only costs a re-run.
    """

    def __init__(self, runtime: Runtime, lease: leases.Lease) -> None:
        self.runtime = runtime
        self.lease = lease
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"ckreg-lease-{lease.run_id}", daemon=True
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        lease_s = self.runtime.settings.merge_lease_s
        while not self._stop.wait(lease_s / 3):
            try:
                with self.runtime.session() as session:
                    renewed = leases.renew_lease(session=session, lease=self.lease, lease_s=lease_s)
            except Exception:
                log.exception("could not renew the lease of merge run %s", self.lease.run_id)
                continue
            if renewed is None:
                log.warning(
                    "merge run %s: lease of attempt %s was taken over",
                    self.lease.run_id,
                    self.lease.attempt,
                )
                self._lost.set()
                return

    def check(self) -> None:
        """Raise ``LeaseLost`` when a heartbeat found the lease gone."""
        if self._lost.is_set():
            raise leases.LeaseLost(
                f"merge run {self.lease.run_id}: attempt {self.lease.attempt} lost its lease"
            )

    def held(self) -> bool:
        """Whether the lease is still this attempt's (asked of the database)."""
        if self._lost.is_set():
            return False
        try:
            with self.runtime.session() as session:
                return leases.holds_lease(session=session, lease=self.lease)
        except Exception:  # cannot tell: treat as held, so the failure is recorded if possible
            return True


def _work(runtime: Runtime) -> Path:
    return runtime.settings.work_dir or runtime.settings.home / "work"


def attempt_root(runtime: Runtime, run_id: int, attempt: int) -> Path:
    """The staging folder of one attempt of a run (``<work>/attempts/run-<id>-attempt-<n>``).

    Attempts never share a folder, so a revived worker cannot write into its successor's
    output. The input cache (``<work>/cache``) stays shared: the folder's ``cache`` links to it.
    """
    work = _work(runtime)
    root = work / "attempts" / f"run-{run_id}-attempt-{attempt}"
    root.mkdir(parents=True, exist_ok=True)
    (work / "cache").mkdir(parents=True, exist_ok=True)
    link = root / "cache"
    if not link.is_symlink():
        link.symlink_to(work / "cache", target_is_directory=True)
    return root


def attempt_roots(runtime: Runtime, run_id: int) -> list[Path]:
    """The staging folders of every attempt of ``run_id`` on this machine."""
    return sorted((_work(runtime) / "attempts").glob(f"run-{run_id}-attempt-*"))


def drop_attempt(runtime: Runtime, lease: leases.Lease, prepared: PreparedMerge | None) -> None:
    """Forget a lost attempt: its staged output is discarded, its staging folder removed."""
    root = _work(runtime) / "attempts" / f"run-{lease.run_id}-attempt-{lease.attempt}"
    shutil.rmtree(root, ignore_errors=True)
    if prepared is None:
        return
    try:
        with runtime.session() as session:
            run = run_service.get_merge_run(session=session, run_id=lease.run_id)
            for staged in outputs.staged_outputs(
                session=session, run=run, name=prepared.output.name
            ):
                if staged.meta.get("attempt") == lease.attempt:
                    outputs.discard_output(
                        session=session, store=runtime.store, checkpoint_id=staged.id or 0
                    )
    except Exception:  # the successor discards it as well
        log.exception("could not discard the output of merge run %s's lost attempt", lease.run_id)


def attempt_lost(exc: BaseException) -> bool:
    """Whether ``exc`` ended the attempt, not the merge: the process was told to stop
    (SIGTERM, SIGINT, Prefect's ``TerminationSignal``), its parent worker died, or its output
    pipe broke with it. Such a run is given back (``release_attempt``), never marked failed:
    the method or the inputs did not fail."""
    if processes.parent_lost():
        return True
    return isinstance(exc, BrokenPipeError) or not isinstance(exc, Exception)


def release_attempt(runtime: Runtime, lease: leases.Lease, exc: BaseException) -> None:
    """Give the run of an interrupted attempt back for the recovery sweep to re-submit."""
    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
    try:
        with runtime.session() as session:
            if leases.release_lease(session=session, lease=lease, reason=reason):
                log.warning(
                    "merge run %s: attempt %s lost (%s)", lease.run_id, lease.attempt, reason
                )
    except Exception:  # the lease then expires: the sweep re-submits the run a little later
        log.exception("could not give back merge run %s", lease.run_id)
