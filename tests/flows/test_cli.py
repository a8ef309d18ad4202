"""The ``ckreg`` command against a real ``ckreg serve`` (embedded) over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import (
    ckreg_env,
    rest_upload,
    run_ckreg,
    serve_ckreg,
    tiny_state,
)
from tests.services import free_port


def test_serve_token_and_policy_commands(tmp_path: Path, evaluator_plugins: Path) -> None:
    env = ckreg_env(tmp_path / "home", evaluator_plugins)
    upgraded = run_ckreg(["db", "upgrade"], env)
    assert upgraded.returncode == 0, upgraded.stderr
    created = run_ckreg(["token", "create", "--name", "ci", "--scope", "write"], env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve_ckreg(env, tmp_path / "serve.log", port)
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            base = rest_upload(
                api, {"Authorization": f"Bearer {token}"}, "base", tiny_state(0), kind="base"
            )
        auth = ["--url", url, "--token", token]
        bad = run_ckreg(
            [
                "policy",
                "create",
                "--name",
                "bad",
                "--method",
                "ties",
                "--base",
                str(base["id"]),
                "--trigger",
                "cron",
                "--cron",
                "not a cron",
                *auth,
            ],
            env,
        )
        assert bad.returncode == 1
        assert "does not parse" in bad.stderr
        good = run_ckreg(
            [
                "policy",
                "create",
                "--name",
                "nightly",
                "--method",
                "ties",
                "--params",
                '{"density": 0.3}',
                "--base",
                str(base["id"]),
                "--task",
                "math",
                "--trigger",
                "cron",
                "--cron",
                "0 3 * * *",
                *auth,
            ],
            env,
        )
        assert good.returncode == 0, good.stderr
        assert "created policy" in good.stdout
        listed = run_ckreg(["policy", "ls", *auth], env)
        assert "nightly" in listed.stdout and "0 3 * * *" in listed.stdout
        shown = run_ckreg(["policy", "show", "1", *auth], env)
        assert '"density": 0.3' in shown.stdout and '"math"' in shown.stdout
        disabled = run_ckreg(["policy", "disable", "1", *auth], env)
        assert disabled.returncode == 0 and "disabled" in disabled.stdout
        assert '"enabled": false' in run_ckreg(["policy", "show", "1", *auth], env).stdout
        # MLflow is unreachable in this env: the base's LoggedModel event waits in the outbox
        # and `mlflow sync` says so (exit 1) instead of losing it.
        outbox = tmp_path / "home" / "mlflow-outbox"
        deadline = time.monotonic() + 30
        while not list(outbox.glob("[0-9]*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        synced = run_ckreg(["mlflow", "sync"], env)
        assert synced.returncode == 1, synced.stdout
        assert "unreachable" in synced.stderr and "1 events still queued" in synced.stderr
        assert len(list(outbox.glob("[0-9]*.json"))) == 1
        unauth = run_ckreg(["policy", "disable", "1", "--url", url, "--token", "wrong"], env)
        assert unauth.returncode == 1 and "401" in unauth.stderr
    finally:
        server.kill()
