"""Merges you can see, through the real ``ckreg`` command against a real ``ckreg serve``
(embedded flows): ``register`` lists and ``--wait``s on the merge runs it triggered, two
Trainer runs' ``checkpoint-30`` merge, ``merges ls | show | watch``, ``show`` and ``lineage``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import Result
from typer.testing import CliRunner

from flows.cli import app
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import ckreg_env, ckreg_token, save_state, serve_ckreg
from tests.flows.fixtures_flows import tiny_state as tiny_weights
from tests.services import free_port

runner = CliRunner()


@dataclass(frozen=True)
class Served:
    url: str
    token: str
    env: dict[str, str]
    tmp: Path

    def ckreg(self, *args: str) -> Result:
        """A client command in this process (CliRunner; the server is a real process)."""
        return runner.invoke(app, [*args, "--url", self.url, "--token", self.token])

    def register(self, folder: Path, *options: str, wait: bool = False) -> tuple[int, str]:
        done = self.ckreg("register", str(folder), "--quiet", *options, *["--wait"] * wait)
        found = re.search(r"registered checkpoint (\d+)", done.stdout)
        assert found, done.output
        return int(found[1]), done.output


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, evaluator_plugins: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("merges-cli")
    # A loaded machine can take minutes to start the embedded Prefect API (default: 20 s).
    env = ckreg_env(
        tmp / "home", evaluator_plugins, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300"
    )
    token = ckreg_token(env)
    port = free_port()
    server = serve_ckreg(env, tmp / "serve.log", port)
    try:
        yield Served(f"http://127.0.0.1:{port}", token, env, tmp)
    finally:
        server.kill()


def trainer_folder(root: Path, run: str, step: int, seed: int) -> Path:
    """A Trainer-style ``<run>/checkpoint-<step>`` folder: weights and trainer_state.json."""
    folder = save_state(root / run / f"checkpoint-{step}", tiny_weights(seed, scale=0.1))
    state = {"global_step": step, "log_history": [{"loss": 0.5 + seed / 10, "step": step}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


@pytest.fixture(scope="module")
def base_id(served: Served) -> int:
    folder = save_state(served.tmp / "base", tiny_weights(0))
    checkpoint_id, _ = served.register(folder, "--kind", "base")
    return checkpoint_id


def test_two_runs_checkpoint_30_merge_and_register_waits(served: Served, base_id: int) -> None:
    created = served.ckreg(
        "policy", "create", "--name", "pair", "--method", "ties", "--params", '{"density": 0.5}',
        "--base", str(base_id), "--task", "a", "--task", "b", "--trigger", "on_register",
        "--evaluator", "ckreg-test-norm",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    root = served.tmp / "runs"
    first, out = served.register(
        trainer_folder(root, "ra", 30, 1), "--base", str(base_id), "--task", "a", "--run", "ra"
    )
    assert "no merge run triggered" in out, out
    second, out = served.register(
        trainer_folder(root, "rb", 30, 2),
        *("--base", str(base_id), "--task", "b", "--run", "rb"),
        wait=True,
    )
    found = re.search(
        rf"merge run (\d+) \(ties, policy \d+, inputs {first},{second}\): succeeded "
        r"-> checkpoint (\d+)",
        out,
    )
    assert found, out  # both inputs are named 'checkpoint-30': qualified by run, not refused
    run_id, merged = int(found[1]), int(found[2])

    listed = served.ckreg("merges", "ls", "--checkpoint", str(first))
    assert listed.exit_code == 0, listed.stderr
    header, row, footer = listed.stdout.strip().splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "METHOD"]
    assert row.split()[:3] == [str(run_id), "succeeded", "ties"] and footer == "(1 of 1)"
    shown = served.ckreg("merges", "show", str(run_id))
    assert shown.exit_code == 0, shown.stderr
    assert "succeeded" in shown.stdout and shown.stdout.count("checkpoint-30") == 2
    watched = served.ckreg("merges", "watch", str(run_id))
    assert watched.exit_code == 0 and "succeeded" in watched.stdout, watched.stderr

    detail = served.ckreg("show", str(merged))
    assert detail.exit_code == 0, detail.stderr
    assert f"merge run {run_id} (ties)" in detail.stdout  # made by
    assert "l2_norm" in detail.stdout and "model.safetensors" in detail.stdout
    as_input = json.loads(served.ckreg("show", str(first), "--json").stdout)
    assert [run["id"] for run in as_input["merge_runs"]] == [run_id]
    assert {m["name"] for m in as_input["metrics"]} == {"loss"}

    tree = served.ckreg("lineage", str(merged)).stdout.splitlines()
    assert tree[0].startswith(f"checkpoint {merged} '"), tree
    assert f"ties by merge run {run_id}" in tree[0] and "l2_norm=" in tree[0], tree
    assert any(f"{first} 'checkpoint-30' [finetune, task a] loss=0.6" in line for line in tree)


def test_failed_merge_exits_nonzero_with_its_error(served: Served, base_id: int) -> None:
    created = served.ckreg(
        "policy", "create", "--name", "curvature", "--method", "ota", "--base", str(base_id),
        "--task", "c", "--task", "d", "--trigger", "on_register",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    root = served.tmp / "runs"
    served.register(trainer_folder(root, "rc", 10, 3), "--base", str(base_id), "--task", "c")
    done = served.ckreg(
        "register", str(trainer_folder(root, "rd", 10, 4)), "--base", str(base_id),
        "--task", "d", "--quiet", "--wait",
    )  # fmt: skip
    assert done.exit_code == 1, done.stdout + done.stderr
    failed = re.search(r"error: merge run (\d+) \(ota, .*\): failed: .*second_moment", done.stderr)
    assert failed, done.stdout + done.stderr
    watched = served.ckreg("merges", "watch", failed[1])
    assert watched.exit_code == 1 and "second_moment" in watched.stderr
    listed = served.ckreg("merges", "ls", "--status", "failed", "--json")
    assert [run["id"] for run in json.loads(listed.stdout)["items"]] == [int(failed[1])]


def test_triggered_by_unknown_checkpoint_is_404(served: Served) -> None:
    response = httpx.get(f"{served.url}/api/v1/merges/triggered-by/987654", timeout=30)
    assert response.status_code == 404
    assert "checkpoint 987654 not found" in response.json()["detail"]["message"]
    missing = served.ckreg("merges", "show", "987654")
    assert missing.exit_code == 1 and "merge run 987654 not found" in missing.output
