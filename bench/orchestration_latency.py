"""Orchestration latency: REST ``complete`` -> merged checkpoint ready, embedded and server mode.

Starts real processes (``ckreg serve``; for server mode also ``prefect server start`` and
``ckreg worker``) in a temporary home, registers a base and two fine-tunes under an
on_register policy, and times the second ``complete`` until the merged checkpoint is ready.
The merge run's own duration (started -> finished) is printed beside it; the difference is
the orchestration overhead. Targets: < 2 s embedded, < 10 s with a Prefect server.

    .venv/bin/python bench/orchestration_latency.py [--mode embedded|server|both] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

from bench._common import free_port

REPO = Path(__file__).resolve().parents[1]
CKREG = [sys.executable, "-c", "from flows.cli import app; app()"]
TARGET_S = {"embedded": 2.0, "server": 10.0}


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        env=env,
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_url(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def state(seed: int, size: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(size, size, generator=gen) for i in range(4)}
    return save(tensors)


def upload(api: httpx.Client, headers: dict[str, str], name: str, data: bytes, **fields) -> int:
    created = api.post(
        "/api/v1/checkpoints",
        json={"name": name, "kind": fields.pop("kind", "finetune"), **fields},
        headers=headers,
    )
    created.raise_for_status()
    checkpoint_id = int(created.json()["id"])
    api.put(
        f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors",
        content=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    ).raise_for_status()
    return checkpoint_id


def measure(
    api: httpx.Client, headers: dict[str, str], base: int, round_: int, size: int
) -> tuple[float, float]:
    """(latency complete -> merged ready, merge run duration) for one new fine-tune.

    Each round completes one new "b": one event, one merge (the one "a" + the new "b").
    """
    before = api.get("/api/v1/merges").json()["total"]
    b = upload(api, headers, f"b{round_}", state(200 + round_, size), base_id=base, task="b")
    started = time.monotonic()
    api.post(f"/api/v1/checkpoints/{b}/complete", json={}, headers=headers).raise_for_status()
    while True:
        runs = api.get("/api/v1/merges", params={"status": "succeeded"}).json()["items"]
        done = [r for r in runs if b in [i["checkpoint_id"] for i in r["inputs"]]]
        if done:
            latency = time.monotonic() - started
            run = done[0]
            duration = (
                datetime.fromisoformat(run["finished_at"])
                - datetime.fromisoformat(run["started_at"])
            ).total_seconds()
            return latency, duration
        if time.monotonic() - started > 120:
            raise TimeoutError(f"no merged checkpoint for round {round_} ({before} runs before)")
        time.sleep(0.05)


def bench_env(home: Path) -> dict[str, str]:
    """The processes' environment: a fresh ckreg home, no inherited ``CKREG_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKREG_")}
    env.update(
        CKREG_HOME=str(home / "home"),
        CKREG_TASK_VECTORS_ON_COMPLETE="false",
        PREFECT_HOME=str(home / "prefect"),
        PYTHONPATH=str(REPO),
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def start_prefect_server(env: dict[str, str], log: Path) -> subprocess.Popen:
    """``prefect server start`` on a free port; points ``env`` at it (server mode)."""
    port = free_port()
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", CKREG_PREFECT_MODE="server")
    args = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start([sys.executable, "-m", *args], env, log)
    wait_url(f"http://127.0.0.1:{port}/api/health")
    return proc


def create_token(env: dict[str, str]) -> str:
    done = subprocess.run(
        [*CKREG, "token", "create", "--name", "bench"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()[-1]


def seed_registry(api: httpx.Client, headers: dict[str, str], size: int) -> int:
    """A ready base, one fine-tune "a" and an on_register policy; returns the base id."""
    base = upload(api, headers, "base", state(0, size), kind="base")
    api.post(f"/api/v1/checkpoints/{base}/complete", json={}, headers=headers).raise_for_status()
    # "a" lands before the policy exists, so only the rounds' "b"s trigger merges.
    a = upload(api, headers, "a", state(100, size), base_id=base, task="a")
    api.post(f"/api/v1/checkpoints/{a}/complete", json={}, headers=headers)
    policy = {
        "name": "bench",
        "method": "task_arithmetic",
        "selector": {"base_id": base},
        "trigger": "on_register",
    }
    api.post("/api/v1/policies", headers=headers, json=policy).raise_for_status()
    return base


def report_rounds(
    api: httpx.Client, headers: dict[str, str], base: int, *, mode: str, repeats: int, size: int
) -> None:
    measure(api, headers, base, 0, size)  # warm-up (first flow run, imports)
    for round_ in range(1, repeats + 1):
        latency, duration = measure(api, headers, base, round_, size)
        overhead = latency - duration
        verdict = "ok" if overhead < TARGET_S[mode] else "OVER TARGET"
        print(
            f"{mode:8s} round {round_}: complete->ready {latency:6.2f} s | "
            f"merge run {duration:6.2f} s | overhead {overhead:6.2f} s "
            f"(target < {TARGET_S[mode]:.0f} s: {verdict})",
            flush=True,
        )


def run_mode(mode: str, repeats: int, size: int) -> None:
    """Start the processes of ``mode`` in a temporary home and print each round's latency."""
    with tempfile.TemporaryDirectory(prefix=f"ckreg-bench-{mode}-") as tmp:
        home = Path(tmp)
        env = bench_env(home)
        procs: list[subprocess.Popen] = []
        try:
            if mode == "server":
                procs.append(start_prefect_server(env, home / "prefect.log"))
            token = create_token(env)
            port = free_port()
            procs.append(start([*CKREG, "serve", "--port", str(port)], env, home / "serve.log"))
            if mode == "server":
                procs.append(start([*CKREG, "worker"], env, home / "worker.log"))
            wait_url(f"http://127.0.0.1:{port}/healthz")
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as api:
                base = seed_registry(api, headers, size)
                if mode == "server":
                    time.sleep(15)  # let the worker register its deployments and event trigger
                report_rounds(api, headers, base, mode=mode, repeats=repeats, size=size)
        finally:
            for proc in reversed(procs):
                stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["embedded", "server", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--size", type=int, default=256, help="Side of each of the 4 square tensors."
    )
    args = parser.parse_args()
    for mode in ["embedded", "server"] if args.mode == "both" else [args.mode]:
        run_mode(mode, args.repeats, args.size)


if __name__ == "__main__":
    main()
