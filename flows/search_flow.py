"""``merge_search(policy_id)``: run a search policy's CMA-ES or M2N2 search as a Prefect flow.

Candidates are merged in memory from the policy's selected inputs and scored by the policy's
evaluator on its validation split (CMA-ES: one metric; M2N2: ``per_example`` scores). After
every candidate the search state goes to the policy's ``search_state`` (one commit) and the
candidate to MLflow as a child run; a killed search started again resumes from that state.
The budget (evaluations, seconds summed over restarts) is respected; ``cancel_search`` stops
it at the next candidate. The best merge is registered as a ``merged`` checkpoint with its
recipe in the metadata and lineage edges to every input.
"""

from __future__ import annotations

import logging
import tempfile
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
from flows.runtime import current_runtime
from flows.search_steps import CmaSearch, M2n2Search
from flows.search_tracking import SearchTracker
from mergeops.io import open_source
from mergeops.methods import base as mb
from registry.errors import InvalidInput, InvalidState
from registry.models import CheckpointCreate, CheckpointKind, LineageCreate, LineageRole
from registry.services import policies as policy_service
from registry.services import searches
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


def _inputs(policy_id: int) -> SearchInputs:
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
                            dict(policy.search_state or {}))  # fmt: skip


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
    objective = None
    if mb.Need.OBJECTIVE in method.needs:
        from flows.merge_flow import evaluator_objective

        objective = evaluator_objective(inputs.evaluator, method)
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


def _save(policy_id: int, state: dict[str, Any]) -> bool:
    """Store the state; returns True when a cancel was asked for meanwhile (kept in the state)."""
    with current_runtime().session() as session:
        current = searches.get_search_state(session=session, policy_id=policy_id) or {}
        cancel = bool(current.get("cancel"))
        searches.save_search_state(session=session, policy_id=policy_id,
                                   state={**state, "cancel": cancel})  # fmt: skip
    return cancel


@flow(name="merge_search", persist_result=False, log_prints=True)
def merge_search(policy_id: int) -> int | None:
    """Run (or resume) the policy's search until its budget is spent or it is cancelled;
    returns the registered best checkpoint's id (None when cancelled)."""
    inputs = _inputs(policy_id)
    state = inputs.state
    if state.get("status") == "finished":
        return state.get("checkpoint_id")
    if state.get("cancel"):  # started again after a cancel: resume
        state = {**state, "cancel": False}
        with current_runtime().session() as session:
            searches.save_search_state(session=session, policy_id=policy_id, state=state)
    search, best_weights = _make_search(inputs)
    runtime = current_runtime()
    tracker = SearchTracker(runtime.settings.mlflow_tracking_uri, runtime.settings.mlflow_experiment,
                            state.get("mlflow_parent_run_id"), f"search-{inputs.name}")  # fmt: skip
    budget = inputs.spec.budget
    done, elapsed = int(state.get("evaluations", 0)), float(state.get("elapsed_s", 0.0))
    history: list[dict[str, Any]] = list(state.get("history", []))
    status = "running"
    while done < budget.evaluations:
        if budget.seconds is not None and elapsed >= budget.seconds:
            break
        if _save(policy_id, _progress(search, done, elapsed, history, "running", tracker)):
            status = "cancelled"
            break
        start = time.perf_counter()
        record = search.step()
        seconds = time.perf_counter() - start
        done, elapsed = done + 1, elapsed + seconds
        history.append({"n": done, "score": record["score"], "seconds": round(seconds, 4)})
        _save(policy_id, _progress(search, done, elapsed, history, "running", tracker))
        tracker.candidate(done, record, seconds)
        print(f"search '{inputs.name}': candidate {done}/{budget.evaluations} "
              f"score {record['score']:.4f} ({seconds:.2f} s)")  # fmt: skip
    if status == "cancelled":
        _save(policy_id, _progress(search, done, elapsed, history, "cancelled", tracker))
        tracker.finish(search.recipe(), None, status)
        return None
    checkpoint_id = _register(inputs, search.recipe(), best_weights())
    final = _progress(search, done, elapsed, history, "finished", tracker)
    _save(policy_id, {**final, "checkpoint_id": checkpoint_id})
    tracker.finish(search.recipe(), checkpoint_id, "finished")
    return checkpoint_id


def _progress(
    search: Search, done: int, elapsed: float, history: list[dict[str, Any]], status: str,
    tracker: SearchTracker,
) -> dict[str, Any]:  # fmt: skip
    return {"status": status, "evaluations": done, "elapsed_s": elapsed, "history": history,
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


def cancel_search(policy_id: int) -> None:
    """Ask a running search to stop at its next candidate (a later start resumes it)."""
    with current_runtime().session() as session:
        state = searches.get_search_state(session=session, policy_id=policy_id) or {}
        searches.save_search_state(session=session, policy_id=policy_id,
                                   state={**state, "cancel": True})  # fmt: skip
