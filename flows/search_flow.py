"""``merge_search(search_id)``: run one merge search (a ``mergesearch`` row of a search policy)
as a Prefect flow.

The flow first claims the search under a lease (renewed while it runs), so exactly one worker
runs it. Candidates are merged in memory from the policy's selected inputs and scored by the
policy's evaluator on its validation split (CMA-ES: one metric; M2N2: ``per_example`` scores).
After every candidate the search state goes to the search's row (one commit) and the candidate
to MLflow as a child run; a killed search started again resumes from that state. The budget
(evaluations, seconds summed over restarts) is respected; a cancel stops it at the next
candidate. The best merge is registered as a ``merged`` checkpoint with its recipe in the
metadata and lineage edges to every input. A failure marks the search failed with its cause.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import flow
from safetensors.torch import save_file

import mergeops
from flows.evaluators import load_evaluator
from flows.inputs import checkpoint_dir
from flows.runtime import Runtime, current_runtime
from flows.search_steps import CmaSearch, M2n2Search
from flows.search_tracking import SearchTracker
from flows.stored_features import needs_stored_features, stored_probe
from mergeops.io import open_source
from mergeops.methods import base as mb
from registry.errors import InvalidInput, InvalidState
from registry.models import CheckpointCreate, CheckpointKind, LineageCreate, LineageRole
from registry.search_models import SearchStatus
from registry.services import leases, search_leases, search_runs, searches
from registry.services import policies as policy_service
from registry.services.common import load_checkpoint
from registry.services.completion import register_directory
from registry.services.lineage import add_lineage_edges
from registry.services.policy_rules import parse_selector

log = logging.getLogger(__name__)
Search = CmaSearch | M2n2Search


@dataclass
class SearchInputs:
    """What a search merges: the policy, its spec, input checkpoints and their local folders."""

    policy_id: int
    name: str
    method: str
    params: dict[str, Any]
    evaluator: str
    spec: searches.SearchSpec
    input_ids: list[int]
    folders: dict[int, Path]
    base_id: int | None
    base_folder: Path | None
    state: dict[str, Any]


def _inputs(policy_id: int, state: dict[str, Any]) -> SearchInputs:
    runtime = current_runtime()
    cache = (runtime.settings.work_dir or runtime.settings.home / "work") / "cache"
    with runtime.session() as session:
        policy = policy_service.get_policy(session=session, policy_id=policy_id)
        if policy.search is None or policy.evaluator is None:
            raise InvalidInput(f"policy '{policy.name}' has no 'search' (and evaluator) to run")
        spec = searches.parse_search(policy.search, owner=f"policy '{policy.name}'")
        selector = parse_selector(policy.selector)
        chosen = policy_service.select_inputs(session=session, selector=selector)
        if len(chosen) < 2:
            raise InvalidState(f"policy '{policy.name}': the selector finds {len(chosen)} "
                               "checkpoint(s); a search needs at least 2")  # fmt: skip
        ids = [c.id or 0 for c in chosen]
        folders = {i: checkpoint_dir(session=session, store=runtime.store, checkpoint_id=i,
                                     cache_dir=cache) for i in ids}  # fmt: skip
        base_folder = None
        if selector.base_id is not None:
            base_folder = checkpoint_dir(session=session, store=runtime.store,
                                         checkpoint_id=selector.base_id, cache_dir=cache)  # fmt: skip
        return SearchInputs(policy_id, policy.name, policy.method, dict(policy.params),
                            policy.evaluator, spec, ids, folders, selector.base_id, base_folder,
                            state)  # fmt: skip


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return mb.load_state_dict(open_source(folder), torch.device("cpu"))


def _make_search(inputs: SearchInputs) -> tuple[Search, Callable[[], dict[str, torch.Tensor]]]:
    """The search and a function giving its best merge's weights."""
    evaluator = load_evaluator(inputs.evaluator)
    saved = inputs.state.get("search")
    if inputs.spec.algorithm == "m2n2":
        per_example = getattr(evaluator, "per_example", None)
        if per_example is None:
            raise InvalidInput(f"policy '{inputs.name}': m2n2 needs per-example scores; "
                               f"evaluator '{inputs.evaluator}' has no per_example()")  # fmt: skip

        def scores(state: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([v.float().reshape(-1) for v in per_example(state).values()])

        m2n2 = M2n2Search(inputs.spec, inputs.input_ids, lambda i: _load(inputs.folders[i]),
                          scores, saved)  # fmt: skip
        return m2n2, lambda: m2n2.weights(m2n2.best_member())
    method = mb.get_method(inputs.method)
    objective = _objective(inputs, method, evaluator) if mb.Need.OBJECTIVE in method.needs else None
    models = [inputs.folders[i] for i in inputs.input_ids]

    def merged(params: dict[str, Any]) -> dict[str, torch.Tensor]:
        return mergeops.merge(inputs.method, models, base=inputs.base_folder, objective=objective,
                              device="cpu", **params)  # fmt: skip

    def score(params: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
        state = merged(params)
        metrics = evaluator.evaluate(state)
        if inputs.spec.metric not in metrics:
            raise InvalidInput(f"evaluator '{inputs.evaluator}' gives no metric "
                               f"'{inputs.spec.metric}'; it gives {sorted(metrics)}")  # fmt: skip
        return float(metrics[inputs.spec.metric]), state

    cma = CmaSearch(inputs.spec, inputs.params, score, saved)
    return cma, lambda: merged(cma.recipe()["params"])


def _objective(inputs: SearchInputs, method: mb.MergeMethod, evaluator: Any) -> Any:
    """The evaluator's objective, or for pleas/ot_fusion without its feature_probe() a probe
    over the inputs' stored ``features`` artifacts (``InvalidInput`` naming one without)."""
    if not needs_stored_features(method, evaluator):
        from flows.merge_flow import evaluator_objective

        return evaluator_objective(inputs.evaluator, method)
    runtime = current_runtime()
    cache = (runtime.settings.work_dir or runtime.settings.home / "work") / "cache"
    with runtime.session() as session:
        checkpoints = [load_checkpoint(session, i) for i in inputs.input_ids]
        return stored_probe(session=session, store=runtime.store, cache_dir=cache,
                            checkpoints=checkpoints,
                            models=[inputs.folders[i] for i in inputs.input_ids],
                            method=inputs.method, params=inputs.params)  # fmt: skip


class _Lease:
    """Keeps the search's lease while the flow runs (renewed every third of its length)."""

    def __init__(self, search_id: int, owner: str, lease_s: float) -> None:
        self.search_id, self.owner, self.lease_s = search_id, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"ckreg-search-lease-{search_id}")  # fmt: skip

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                with current_runtime().session() as session:
                    if not search_leases.renew_lease(session=session, search_id=self.search_id,
                                                   owner=self.owner, lease_s=self.lease_s):  # fmt: skip
                        return
            except Exception:  # the database briefly away: the next beat retries
                log.exception("could not renew the lease of search %s", self.search_id)

    def save(self, progress: dict[str, Any]) -> bool:
        """Store the progress; True when a cancel was asked for meanwhile."""
        with current_runtime().session() as session:
            return search_leases.save_progress(session=session, search_id=self.search_id,
                                             owner=self.owner, lease_s=self.lease_s,
                                             progress=progress)  # fmt: skip

    def finish(self, status: SearchStatus, **fields: Any) -> None:
        with current_runtime().session() as session:
            search_leases.finish_search(session=session, search_id=self.search_id,
                                      owner=self.owner, status=status, **fields)  # fmt: skip


@flow(name="merge_search", persist_result=False, log_prints=True)
def merge_search(search_id: int) -> int | None:
    """Run (or resume) search ``search_id`` until its budget is spent or it is cancelled;
    returns the registered best checkpoint's id (None when cancelled or not claimable:
    finished already, or run by another live worker)."""
    runtime = current_runtime()
    owner, lease_s = leases.new_owner(), runtime.settings.merge_lease_s
    with runtime.session() as session:
        claimed = search_leases.claim_search(session=session, search_id=search_id, owner=owner,
                                           lease_s=lease_s)  # fmt: skip
        row = search_runs.get_search(session=session, search_id=search_id)
    if not claimed:
        print(f"search {search_id} is {row.status}; not run here")
        return row.checkpoint_id
    with _Lease(search_id, owner, lease_s) as lease:
        try:
            return _run(row.policy_id, dict(row.state or {}), lease)
        except search_leases.SearchLeaseLost:
            log.warning("search %s was taken over by another worker; stopping", search_id)
            return None
        except Exception as exc:
            lease.finish(SearchStatus.failed, error=f"{type(exc).__name__}: {exc}")
            raise


def _run(policy_id: int, state: dict[str, Any], lease: _Lease) -> int | None:
    inputs = _inputs(policy_id, state)
    search, best_weights = _make_search(inputs)
    runtime = current_runtime()
    tracker = SearchTracker(runtime.settings.mlflow_tracking_uri, runtime.settings.mlflow_experiment,
                            state.get("mlflow_parent_run_id"), f"search-{inputs.name}")  # fmt: skip
    budget = inputs.spec.budget
    done, elapsed = int(state.get("evaluations", 0)), float(state.get("elapsed_s", 0.0))
    history: list[dict[str, Any]] = list(state.get("history", []))
    cancelled = False
    while done < budget.evaluations:
        if budget.seconds is not None and elapsed >= budget.seconds:
            break
        if lease.save(_progress(search, done, elapsed, history, tracker)):
            cancelled = True
            break
        start = time.perf_counter()
        record = search.step()
        seconds = time.perf_counter() - start
        done, elapsed = done + 1, elapsed + seconds
        history.append({"n": done, "score": record["score"], "seconds": round(seconds, 4)})
        lease.save(_progress(search, done, elapsed, history, tracker))
        tracker.candidate(done, record, seconds)
        print(f"search '{inputs.name}': candidate {done}/{budget.evaluations} "
              f"score {record['score']:.4f} ({seconds:.2f} s)")  # fmt: skip
    if cancelled:
        lease.finish(SearchStatus.cancelled)
        tracker.finish(search.recipe() if done else {"score": float("nan")}, None, "cancelled")
        return None
    checkpoint_id = _register(inputs, search.recipe(), best_weights())
    lease.finish(SearchStatus.finished, checkpoint_id=checkpoint_id)
    tracker.finish(search.recipe(), checkpoint_id, "finished")
    return checkpoint_id


def _progress(
    search: Search, done: int, elapsed: float, history: list[dict[str, Any]],
    tracker: SearchTracker,
) -> dict[str, Any]:  # fmt: skip
    return {"evaluations": done, "elapsed_s": elapsed, "history": history,
            "search": search.state(), "mlflow_parent_run_id": tracker.parent_run_id}  # fmt: skip


def _register(
    inputs: SearchInputs, recipe: dict[str, Any], weights: dict[str, torch.Tensor]
) -> int:
    """The best merge as a ready ``merged`` checkpoint with its recipe and input lineage."""
    runtime = current_runtime()
    meta = {"search": {"policy_id": inputs.policy_id, "algorithm": inputs.spec.algorithm,
                       "method": inputs.method if inputs.spec.algorithm == "cma_es" else "slerp",
                       "metric": inputs.spec.metric, "evaluator": inputs.evaluator, **recipe}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_file(
            {k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors")
        )
        with runtime.session() as session:
            checkpoint = register_directory(
                session=session, store=runtime.store, settings=runtime.settings,
                data=CheckpointCreate(name=f"{inputs.name}-search-best", kind=CheckpointKind.merged,
                                      base_id=inputs.base_id, metadata=meta),
                directory=folder,
            )  # fmt: skip
            child = checkpoint.id or 0
            edges = [LineageCreate(parent_id=i, child_id=child, role=LineageRole.input)
                     for i in inputs.input_ids]  # fmt: skip
            if inputs.base_id is not None:
                edges.append(LineageCreate(parent_id=inputs.base_id, child_id=child,
                                           role=LineageRole.base))  # fmt: skip
            add_lineage_edges(session=session, edges=edges)
    return child


def cancel_search(search_id: int) -> None:
    """Ask search ``search_id`` to stop at its next candidate (a later start resumes it)."""
    with current_runtime().session() as session:
        search_runs.cancel_search(session=session, search_id=search_id)


def stale_searches(runtime: Runtime, *, settle_s: float | None = None) -> list[int]:
    """Searches a recovery sweep launches again: their worker died, or (queued) nobody claimed
    them within ``settle_s`` (default ``CKREG_MERGE_CLAIM_GRACE_S``; at start-up, the time since
    the process started: older ones were in the job queue that died with the last process).
    State is kept, so each resumes at its last candidate."""
    if settle_s is None:
        settle_s = runtime.settings.merge_claim_grace_s
    with runtime.session() as session:
        return search_leases.reclaim_stale_searches(session=session, claim_grace_s=settle_s)
