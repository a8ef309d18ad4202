"""``merge_checkpoints(run_id)``: inputs from the store -> stream merge -> merged checkpoint.

Then evaluate, mark the run succeeded and log to MLflow. Any failure marks the run failed with
the error and the half-made output failed; running the flow again for the run succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import mergeops
from flows import outputs
from flows.evaluate_flow import store_metrics
from flows.evaluators import load_evaluator
from flows.preparation import PreparedMerge, prepare
from flows.runtime import current_runtime
from mergeops.methods import base as mb
from registry.services import merge_run_states as run_states
from registry.services import merge_runs as run_service

log = logging.getLogger(__name__)

GPU_LIMIT = "ckreg-merge-gpu"
IO_RETRIES = 2


@task(retries=IO_RETRIES, retry_delay_seconds=1, cache_policy=NO_CACHE, persist_result=False)
def prepare_inputs(run_id: int) -> PreparedMerge:
    """Resolve the run's inputs to local files (I/O: retried)."""
    runtime = current_runtime()
    with runtime.session() as session:
        return prepare(
            session=session,
            store=runtime.store,
            work_root=runtime.settings.work_dir or runtime.settings.home / "work",
            run_id=run_id,
            cache_max_bytes=runtime.settings.cache_max_bytes,
        )


@task(cache_policy=NO_CACHE, persist_result=False)
def run_merge(prepared: PreparedMerge) -> mergeops.MergeResult:
    """Stream the merge into the run's work folder."""
    objective = None
    if mb.Need.OBJECTIVE in mb.get_method(prepared.method).needs and prepared.evaluator:
        objective = load_evaluator(prepared.evaluator).objective()
    return mergeops.merge_files(
        **prepared.input_kwargs(),
        out_dir=prepared.out_dir,
        objective=objective,
        state_path=prepared.state_path,
        device=current_runtime().settings.device,
        progress=False,
    )


@task(retries=IO_RETRIES, retry_delay_seconds=1, cache_policy=NO_CACHE, persist_result=False)
def publish_output(prepared: PreparedMerge) -> int:
    """Upload and register the merged checkpoint with its lineage (I/O: retried)."""
    runtime = current_runtime()
    with runtime.session() as session:
        run = run_service.get_merge_run(session=session, run_id=prepared.run_id)
        checkpoint = outputs.start_output(session=session, run=run, spec=prepared.output)
        ready = outputs.upload_output(
            session=session,
            store=runtime.store,
            settings=runtime.settings,
            run=run,
            checkpoint=checkpoint,
            out_dir=prepared.out_dir,
            spec=prepared.output,
        )
        return ready.id or 0


@task(cache_policy=NO_CACHE, persist_result=False)
def evaluate_output(prepared: PreparedMerge) -> dict[str, float]:
    """Score the merged files in the work folder with the run's evaluator."""
    import torch

    from mergeops.io import open_source

    assert prepared.evaluator is not None
    state = mb.load_state_dict(open_source(prepared.out_dir), torch.device("cpu"))
    return dict(load_evaluator(prepared.evaluator).evaluate(state))


@contextlib.contextmanager
def merge_slot() -> Iterator[None]:
    """One merge per GPU: a Prefect global concurrency slot when a Prefect server is in use.

    Embedded mode runs merges on one worker thread, which already serialises them.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=False, lease_duration=60):
        yield


@flow(name="merge_checkpoints", persist_result=False, log_prints=True)
def merge_checkpoints(run_id: int, tensor_ranges: int = 1) -> int | None:
    """Run merge run ``run_id``; returns the merged checkpoint's id.

    ``tensor_ranges > 1`` splits per-tensor methods into that many range tasks on the flow's
    task runner (a ``DaskTaskRunner`` via ``merge_checkpoints.with_options(task_runner=...)``).
    """
    runtime = current_runtime()
    with runtime.session() as session:
        run = run_states.claim_merge_run(
            session=session, run_id=run_id, orchestration_run_id=_flow_run_id()
        )
        if run is None:  # already succeeded: idempotent no-op
            return run_service.get_merge_run(session=session, run_id=run_id).output_checkpoint_id
    prepared: PreparedMerge | None = None
    try:
        prepared = prepare_inputs(run_id)
        with merge_slot():
            if tensor_ranges > 1:
                from flows.split import split_merge

                split_merge(prepared, parts=tensor_ranges, device=runtime.settings.device)
            else:
                run_merge(prepared)
        # Evaluated before it is published: a ready output has its metrics (or failed to).
        metrics = evaluate_output(prepared) if prepared.evaluator else {}
        output_id = publish_output(prepared)
        if metrics and prepared.evaluator:
            store_metrics(output_id, metrics, prepared.evaluator)
        with runtime.session() as session:
            run_states.finish_merge_run(
                session=session, run_id=run_id, output_checkpoint_id=output_id
            )
    except BaseException as exc:
        _record_failure(run_id, prepared, exc)
        raise
    in_background(_track, run_id, output_id, metrics, prepared)
    # The work folder holds only the uploaded output now; the input cache stays for reuse.
    shutil.rmtree(prepared.out_dir, ignore_errors=True)
    return output_id


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    value = flow_run.id
    return str(value) if value else None


def _record_failure(run_id: int, prepared: PreparedMerge | None, exc: BaseException) -> None:
    """Mark the run failed with the error and its half-made output failed."""
    error = f"{type(exc).__name__}: {exc}"
    runtime = current_runtime()
    try:
        with runtime.session() as session:
            run = run_service.get_merge_run(session=session, run_id=run_id)
            if prepared is not None:
                pending = outputs.existing_output(session=session, name=prepared.output.name)
                output_id = pending.id if pending is not None else run.output_checkpoint_id
                outputs.fail_output(
                    session=session, store=runtime.store, checkpoint_id=output_id, error=error
                )
            run_states.fail_merge_run(session=session, run_id=run_id, error=error)
    except Exception:  # the original error matters more than a failure to record it
        log.exception("could not record the failure of merge run %s", run_id)


def in_background(work: Callable[..., None], *args: Any) -> None:
    """Run side work (MLflow logging) on the runtime's background thread, else inline."""
    background = current_runtime().background
    if background is not None:
        background.submit(work, *args)
    else:
        work(*args)


def track_checkpoint(checkpoint_id: int) -> None:
    """Log a ready checkpoint as an external LoggedModel; never fails (the tracker queues)."""
    runtime = current_runtime()
    try:
        from flows.tracking import tracker_from_settings
        from flows.tracking_records import checkpoint_record
        from registry.models import CheckpointStatus
        from registry.services.common import load_checkpoint

        with runtime.session() as session:
            checkpoint = load_checkpoint(session, checkpoint_id)
            if checkpoint.status != CheckpointStatus.ready:
                return
            record = checkpoint_record(
                session=session, checkpoint=checkpoint, store_url=runtime.settings.store_url
            )
        tracker_from_settings(runtime.settings).log_checkpoint(record)
    except Exception:
        log.exception("MLflow tracking of checkpoint %s failed", checkpoint_id)


def _track(run_id: int, output_id: int, metrics: dict[str, float], prepared: PreparedMerge) -> None:
    """Log the merge to MLflow; failures are queued by the tracker and never fail the merge."""
    runtime = current_runtime()
    try:
        from flows.tracking import tracker_from_settings
        from flows.tracking_records import merge_record

        with runtime.session() as session:
            run = run_service.get_merge_run(session=session, run_id=run_id)
            record = merge_record(
                session=session,
                run=run,
                output_id=output_id,
                metrics=metrics,
                prepared=prepared,
                store_url=runtime.settings.store_url,
            )
        mlflow_run_id = tracker_from_settings(runtime.settings).log_merge(record)
        if mlflow_run_id:
            with runtime.session() as session:
                run_states.set_mlflow_run_id(
                    session=session, run_id=run_id, mlflow_run_id=mlflow_run_id
                )
    except Exception:
        log.exception("MLflow tracking of merge run %s failed (merge kept)", run_id)
