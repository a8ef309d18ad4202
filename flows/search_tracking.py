"""MLflow for merge searches: one parent run per search, one child run per candidate.

Best effort: a search never fails or waits on MLflow. An HTTP tracking server that does not
answer its health check within a few seconds turns tracking off for the search (logged).
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def _reachable(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return bool(uri)
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class SearchTracker:
    """Child runs under the search's parent run (resumed by id after a restart)."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str | None, name: str) -> None:
        self.client: Any = None
        self.parent_run_id = parent_run_id
        if not _reachable(uri):
            log.warning("MLflow at %r unreachable: search candidates are not tracked", uri)
            return
        try:
            from mlflow import MlflowClient

            self.client = MlflowClient(uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
            if self.parent_run_id is None:
                run = self.client.create_run(self.experiment_id, run_name=name,
                                             tags={"ckreg.search": "true"})  # fmt: skip
                self.parent_run_id = run.info.run_id
        except Exception:
            log.exception("MLflow tracking of search %r off", name)
            self.client = None

    def candidate(self, index: int, record: dict[str, Any], seconds: float) -> None:
        """Log candidate ``index``: its params (or recipe) and score, as a finished child run."""
        if self.client is None:
            return
        try:
            from mlflow.entities import Metric, Param

            run = self.client.create_run(
                self.experiment_id, run_name=f"candidate-{index}",
                tags={"mlflow.parentRunId": self.parent_run_id or "", "ckreg.search.candidate": str(index)},
            )  # fmt: skip
            params = record.get("params") or {"recipe": json.dumps(record.get("recipe"))[:6000]}
            self.client.log_batch(
                run.info.run_id,
                params=[Param(str(k), str(v)[:6000]) for k, v in params.items()],
                metrics=[Metric("score", float(record["score"]), 0, index),
                         Metric("seconds", seconds, 0, index)],
            )  # fmt: skip
            self.client.set_terminated(run.info.run_id)
        except Exception:
            log.exception("MLflow: candidate %s of the search not logged", index)

    def finish(self, best: dict[str, Any], checkpoint_id: int | None, status: str) -> None:
        """Log the best score and registered checkpoint on the parent run and close it."""
        if self.client is None or self.parent_run_id is None:
            return
        try:
            from mlflow.entities import Metric

            self.client.log_batch(
                self.parent_run_id, metrics=[Metric("best_score", float(best["score"]), 0, 0)]
            )
            if checkpoint_id is not None:
                self.client.set_tag(self.parent_run_id, "ckreg.checkpoint_id", str(checkpoint_id))
            self.client.set_terminated(
                self.parent_run_id, "FINISHED" if status == "finished" else "KILLED"
            )
        except Exception:
            log.exception("MLflow: search parent run not finished")
