"""``ckreg search`` against ``ckreg serve --mode server``: the registry hands the search to the
``ckreg-search`` deployment that ``ckreg worker`` serves (Prefect server), and the CLI starts,
follows, lists and refuses to cancel a finished search over REST."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import (
    Process,
    ckreg_env,
    ckreg_token,
    create_policy,
    rest_upload,
    serve_ckreg,
    start_ckreg,
    tiny_state,
)
from tests.flows.test_server_mode import _start_prefect_server, _wait_deployments
from tests.services import free_port

runner = CliRunner()


@pytest.mark.slow
def test_search_cli_against_server_mode(tmp_path: Path, evaluator_plugins: Path) -> None:
    prefect_env = ckreg_env(tmp_path / "home", evaluator_plugins,
                            PREFECT_HOME=str(tmp_path / "prefect"),
                            PREFECT_SERVER_ANALYTICS_ENABLED="false",
                            PREFECT_SERVER_UI_ENABLED="false")  # fmt: skip
    processes: list[Process] = []
    try:
        prefect, api_url = _start_prefect_server(tmp_path, prefect_env)
        processes.append(prefect)
        env = {**prefect_env, "PREFECT_API_URL": api_url, "CKREG_PREFECT_MODE": "server"}
        token = ckreg_token(env)
        headers = {"Authorization": f"Bearer {token}"}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        processes.append(serve_ckreg(env, tmp_path / "serve.log", port))
        worker = start_ckreg(["worker"], env, tmp_path / "worker.log")
        processes.append(worker)
        with httpx.Client(base_url=url, timeout=30) as api:
            base = rest_upload(api, headers, "base", tiny_state(0), kind="base")["id"]
            for seed, task in ((1, "a"), (2, "b")):
                rest_upload(api, headers, f"ft-{task}", tiny_state(seed), base_id=base, task=task)
            search = {"algorithm": "cma_es", "budget": {"evaluations": 4},
                      "space": {"lambda": [0.0, 1.0]}, "metric": "l2_norm"}  # fmt: skip
            policy = create_policy(api, headers, name="search", method="task_arithmetic",
                                   selector={"base_id": base}, evaluator="ckreg-test-norm",
                                   search=search)["id"]  # fmt: skip
            _wait_deployments(api_url, worker)
            _wait_search_deployment(api_url, worker)
            opts = ["--url", url, "--token", token]
            started = time.monotonic()
            result = runner.invoke(app, ["search", "start", str(policy), "-f", "--interval",
                                         "0.5", *opts])  # fmt: skip
            elapsed = time.monotonic() - started
            assert result.exit_code == 0, result.output + worker.output()
            assert "finished, 4/4 evaluations" in result.output
            found = re.search(r"search (\d+) .*registered checkpoint (\d+)", result.output)
            assert found, result.output
            listed = runner.invoke(app, ["search", "ls", "--policy", str(policy), *opts])
            assert f"search {found[1]} (policy {policy}, cma_es): finished" in listed.output
            cancel = runner.invoke(app, ["search", "cancel", found[1], *opts])
            assert cancel.exit_code == 1 and "is finished" in cancel.output
            merged = api.get(f"/api/v1/checkpoints/{found[2]}").json()
            assert (
                merged["status"] == "ready"
                and merged["metadata"]["search"]["algorithm"] == "cma_es"
            )
        print(f"server-mode search of 4 candidates: {elapsed:.1f} s from start to finished")
    finally:
        for process in reversed(processes):
            process.kill()


def _wait_search_deployment(api_url: str, worker: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = httpx.post(f"{api_url}/deployments/filter", json={}, timeout=5).json()
        if "ckreg-search" in {d["name"] for d in found}:
            return
        time.sleep(0.5)
    raise AssertionError(f"no ckreg-search deployment within {timeout}s:\n{worker.output()}")
