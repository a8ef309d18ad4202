"""``merge_checkpoints(run_id)``: inputs from the store -> stream merge -> merged checkpoint.

The flow first claims the run's lease (``registry.services.leases``; a heartbeat renews it),
works in a staging folder keyed by run and attempt, evaluates, and adopts the output and the
run's success in one transaction conditioned on the lease; then logs to MLflow. A worker that
lost its lease drops its work. Any other failure marks the run failed with the error and the
half-made output failed; running the flow again for the run succeeds.
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
from flows.attempts import (
    LeaseKeeper,
    attempt_lost,
    attempt_root,
    attempt_roots,
    drop_attempt,
    release_attempt,
)
from flows.evaluate_flow import store_metrics
from flows.evaluators import load_evaluator
from flows.preparation import PreparedMerge, prepare
from flows.processes import started_by_runner, watch_parent
from flows.retries import IO_TASK
from flows.runtime import Runtime, current_runtime, run_bound
from flows.stored_features import merge_objective
from mergeops.methods import base as mb
from registry.models import MergeRunStatus
from registry.services import leases
from registry.services import merge_run_states as run_states
from registry.services import merge_runs as run_service

log = logging.getLogger(__name__)

GPU_LIMIT = "ckreg-merge-gpu"


@task(**IO_TASK)
def prepare_inputs(run_id: int, attempt: int) -> PreparedMerge:
    """Resolve the run's inputs into the attempt's staging folder (I/O: retried)."""
    runtime = current_runtime()
    with runtime.session() as session:
        return prepare(
            session=session,
            store=runtime.store,
            work_root=attempt_root(runtime, run_id, attempt),
            run_id=run_id,
            cache_max_bytes=runtime.settings.cache_max_bytes,
        )


def evaluator_objective(evaluator_name: str, method: mb.MergeMethod) -> Any:
    """The evaluator's objective the method asks for: the supervised proxy loss (fw), the
    loss on unlabeled inputs (``objective_kind = "unlabeled"``: adamerging's entropy) or a
    layer-input probe (``"gram_probe"``: regmean_plusplus) or a feature probe
    (``"feature_probe"``: pleas, ot_fusion)."""
    evaluator = load_evaluator(evaluator_name)
    kind = getattr(method, "objective_kind", "supervised")
    provider = getattr(evaluator, _OBJECTIVE_PROVIDERS[kind], None)
    if provider is None:
        raise RuntimeError(
            f"method '{method.name}' needs the evaluator's {_OBJECTIVE_PROVIDERS[kind]}(), "
            f"which evaluator '{evaluator_name}' does not have"
        )
    return provider()


#: Which evaluator method gives a method's objective, by the method's ``objective_kind``.
_OBJECTIVE_PROVIDERS = {
    "supervised": "objective",
    "unlabeled": "unlabeled_objective",
    "gram_probe": "gram_probe",
    "feature_probe": "feature_probe",
}


@task(cache_policy=NO_CACHE, persist_result=False)
def run_merge(prepared: PreparedMerge) -> mergeops.MergeResult:
    """Stream the merge into the run's work folder."""
    if prepared.mergekit is not None:
        from flows.mergekit_flow import run_mergekit

        return run_mergekit(prepared, device=current_runtime().settings.device)
    objective = None
    method = mb.get_method(prepared.method)
    if mb.Need.OBJECTIVE in method.needs:  # pleas/ot_fusion: stored features if no probe
        objective = merge_objective(prepared, method)
    return mergeops.merge_files(
        **prepared.input_kwargs(),
        out_dir=prepared.out_dir,
        objective=objective,
        state_path=prepared.state_path,
        device=current_runtime().settings.device,
        progress=False,
    )


@task(**IO_TASK)
def publish_output(prepared: PreparedMerge, lease: leases.Lease, metrics: dict[str, float]) -> int:
    """Stage the merged checkpoint (files, lineage, state, metrics), then adopt it under the
    lease: ready and the run succeeded in one transaction (I/O: retried; a lost lease is not)."""
    runtime = current_runtime()
    with runtime.session() as session:
        run = run_service.get_merge_run(session=session, run_id=prepared.run_id)
        if not leases.holds_lease(session=session, lease=lease):
            raise leases.LeaseLost(f"merge run {run.id}: lease of attempt {lease.attempt} lost")
        checkpoint = outputs.start_output(
            session=session, store=runtime.store, run=run, spec=prepared.output, lease=lease
        )
        staged = outputs.upload_output(
            session=session,
            store=runtime.store,
            settings=runtime.settings,
            run=run,
            checkpoint=checkpoint,
            out_dir=prepared.out_dir,
            spec=prepared.output,
        )
    output_id = staged.id or 0
    if metrics and prepared.evaluator:  # on the staged output: a ready output has its metrics
        store_metrics(output_id, metrics, prepared.evaluator)
    with runtime.session() as session:
        outputs.adopt_output(
            session=session,
            store=runtime.store,
            settings=runtime.settings,
            lease=lease,
            checkpoint_id=output_id,
        )
    return output_id


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
    from flows.gpu_slot import hold  # its lease is released at once should this flow die

    with hold(GPU_LIMIT, _flow_run_id()):
        yield


@flow(name="merge_checkpoints", persist_result=False, log_prints=True)
def merge_checkpoints(run_id: int, tensor_ranges: int = 1) -> int | None:
    """Run merge run ``run_id``; returns the merged checkpoint's id.

    A run that succeeded already returns its output; one another live worker holds returns
    None (that worker completes it, or the recovery sweep re-submits it once its lease expires).
    ``tensor_ranges > 1`` splits per-tensor methods into that many range tasks on the flow's
    task runner (a ``DaskTaskRunner`` via ``merge_checkpoints.with_options(task_runner=...)``).
    """
    runtime = current_runtime()
    if started_by_runner():  # a flow-run subprocess of `ckreg worker`
        watch_parent((runtime.settings.work_dir or runtime.settings.home) / "orphaned-flows.log")
    with runtime.session() as session:
        lease = leases.claim_merge_run(
            session=session,
            run_id=run_id,
            owner=leases.new_owner(),
            lease_s=runtime.settings.merge_lease_s,
            orchestration_run_id=_flow_run_id(),
        )
        if lease is None:
            run = run_service.get_merge_run(session=session, run_id=run_id)
            if run.status != MergeRunStatus.succeeded:
                log.info("merge run %s is held by %s; not run here", run_id, run.lease_owner)
            return run.output_checkpoint_id
    with LeaseKeeper(runtime, lease) as keeper:
        done = _run_claimed(runtime, lease, keeper, tensor_ranges)
    if done is None:
        return None
    output_id, metrics, prepared = done
    in_background(_track, lease.run_id, output_id, metrics, prepared)
    # The staging folders hold only uploaded outputs now; the input cache stays for reuse.
    for root in attempt_roots(runtime, lease.run_id):
        shutil.rmtree(root, ignore_errors=True)
    return output_id


def _run_claimed(
    runtime: Runtime, lease: leases.Lease, keeper: LeaseKeeper, tensor_ranges: int
) -> tuple[int, dict[str, float], PreparedMerge] | None:
    """The merge itself, under a held lease, up to the adopted output: its id, metrics and
    preparation; None when the lease was lost midway."""
    prepared: PreparedMerge | None = None
    try:
        prepared = prepare_inputs(lease.run_id, lease.attempt)
        with merge_slot():
            keeper.check()
            if tensor_ranges > 1 and prepared.mergekit is None:
                from flows.split import split_merge

                split_merge(prepared, parts=tensor_ranges, device=runtime.settings.device)
            else:
                run_merge(prepared)
        keeper.check()
        # Evaluated before it is published: a ready output has its metrics (or failed to).
        metrics = evaluate_output(prepared) if prepared.evaluator else {}
        keeper.check()
        output_id = publish_output(prepared, lease, metrics)
    except Exception as exc:
        if not keeper.held():
            log.warning("merge run %s: %s; attempt %s dropped", lease.run_id, exc, lease.attempt)
            drop_attempt(runtime, lease, prepared)
            return None
        _fail_or_release(runtime, lease, prepared, exc)
        raise
    except BaseException as exc:
        _fail_or_release(runtime, lease, prepared, exc)
        raise
    return output_id, metrics, prepared


def _fail_or_release(
    runtime: Runtime, lease: leases.Lease, prepared: PreparedMerge | None, exc: BaseException
) -> None:
    """A lost attempt (stopped, its worker dead) gives the run back; anything else fails it."""
    if attempt_lost(exc):
        release_attempt(runtime, lease, exc)
    else:
        _record_failure(lease, prepared, exc)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    value = flow_run.id
    return str(value) if value else None


def _record_failure(
    lease: leases.Lease, prepared: PreparedMerge | None, exc: BaseException
) -> None:
    """Mark the run failed with the error and the attempt's half-made output failed."""
    error = f"{type(exc).__name__}: {exc}"
    runtime = current_runtime()
    failed = False
    try:
        with runtime.session() as session:
            if not leases.fail_under_lease(session=session, lease=lease, error=error):
                return  # another worker holds the run now: its outcome counts, not this one
            failed = True
            if prepared is None:
                return
            run = run_service.get_merge_run(session=session, run_id=lease.run_id)
            for staged in outputs.staged_outputs(
                session=session, run=run, name=prepared.output.name
            ):
                if staged.meta.get("attempt") == lease.attempt:
                    outputs.fail_output(
                        session=session, store=runtime.store, checkpoint_id=staged.id, error=error
                    )
    except Exception:  # the original error matters more than a failure to record it
        log.exception("could not record the failure of merge run %s", lease.run_id)
    finally:
        if failed:  # committed: log it to MLflow as a FAILED run, off the merge path
            from flows.tracking_records import track_failed_merge

            in_background(track_failed_merge, lease.run_id, lease.attempt, error)


def in_background(work: Callable[..., None], *args: Any) -> None:
    """Run side work (MLflow logging) on the runtime's background thread, else inline."""
    runtime = current_runtime()
    if runtime.background is not None:
        runtime.background.submit(run_bound, runtime, work, *args)
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
