"""Client calls for merge policies and merge runs (``/policies``, ``/merges``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from registry.client.transport import BaseClient, ClientError

TERMINAL = frozenset({"succeeded", "failed"})


class MergesMixin(BaseClient):
    """Declare policies, start merges and follow their runs."""

    def create_policy(self, **policy: Any) -> dict[str, Any]:
        """``POST /policies`` (name, method, params, selector, trigger, cron, evaluator)."""
        return self._json("POST", "/policies", json=policy)

    def policies(self) -> list[dict[str, Any]]:
        return self._json("GET", "/policies")

    def run_policy(self, policy_id: int) -> dict[str, Any] | None:
        """Start a policy now; the run, or None when its selector finds too few inputs."""
        return self._json("POST", f"/policies/{policy_id}/run")

    def merge(
        self,
        method: str,
        inputs: Sequence[int] | Mapping[int, float],
        *,
        base_id: int | None = None,
        params: Mapping[str, Any] | None = None,
        evaluator: str | None = None,
    ) -> dict[str, Any]:
        """Start an ad-hoc merge of checkpoint ids (optionally id -> weight); the same inputs,
        method and params return the existing run."""
        weighted = inputs.items() if isinstance(inputs, Mapping) else ((i, None) for i in inputs)
        body = {
            "method": method,
            "base_id": base_id,
            "params": dict(params or {}),
            "inputs": [{"checkpoint_id": i, "weight": w} for i, w in weighted],
            "evaluator": evaluator,
        }
        return self._json("POST", "/merges", json=body)

    def merge_config(
        self, config: str | Mapping[str, Any], *, evaluator: str | None = None
    ) -> dict[str, Any]:
        """Start a merge from a mergekit YAML (text or mapping) whose models are checkpoint ids
        (``12``, ``ckreg/12``) or names (``ckreg/my-ft``); the same config returns the existing
        run."""
        body = {"mergekit": config if isinstance(config, str) else dict(config)}
        return self._json("POST", "/merges", json=body | {"evaluator": evaluator})

    def merge_run(self, run_id: int) -> dict[str, Any]:
        return self._json("GET", f"/merges/{run_id}")

    def merge_runs(self, *, policy_id: int | None = None) -> list[dict[str, Any]]:
        """Every merge run (optionally of one policy), oldest first, across all pages."""
        params: dict[str, Any] = {"limit": 1000}
        if policy_id is not None:
            params["policy_id"] = policy_id
        items: list[dict[str, Any]] = []
        while True:
            page = self._json("GET", "/merges", params=params | {"offset": len(items)})
            items += page["items"]
            if not page["items"] or len(items) >= page["total"]:
                return sorted(items, key=lambda run: run["id"])

    def list_merge_runs(self, **filters: Any) -> dict[str, Any]:
        """One page ``{items, total, limit, offset}``, newest first; filters: status, policy_id,
        input_checkpoint_id, limit, offset (``None`` values are dropped)."""
        params = {key: value for key, value in filters.items() if value is not None}
        return self._json("GET", "/merges", params=params)

    def merge_triggers(self, checkpoint_id: int) -> dict[str, Any]:
        """``{checkpoint_id, runs, waiting}``: runs taking the checkpoint, and on_register
        policies (``{id, name}``) that will take it but have not planned their run yet."""
        return self._json("GET", f"/merges/triggered-by/{checkpoint_id}")

    def wait_for_merge(self, run_id: int, *, timeout: float = 600.0) -> dict[str, Any]:
        """Poll a run until it succeeds (returns it) or fails (raises ``ClientError``)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.merge_run(run_id)
            if run["status"] == "failed":
                raise ClientError(409, f"merge run {run_id} failed: {run['error']}", "merge_failed")
            if run["status"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"merge run {run_id} still {run['status']} after {timeout:.0f}s")
            time.sleep(0.2)
