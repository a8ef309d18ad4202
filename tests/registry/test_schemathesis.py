"""Issue 9: a bounded schemathesis run against a live registry process, in CI.

Fixed seed, a few cases per operation in every phase (examples, coverage, fuzzing, stateful),
with a write token. The schema's OpenAPI links (``registry.api.links``) chain created
checkpoints, policies and merge runs into the calls that take their ids; a ready base, a ready
fine-tune, a policy and a merge run exist beforehand so generated small ids hit real objects.
Fails on any 5xx, any response that violates the schema and any undocumented content type.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.registry.live_server import ServerProcess, registry_process
from tests.registry.registry_fixtures import st_bytes, tiny_state

SEED = 20261203
MAX_EXAMPLES = 5
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"


def seed_objects(server: ServerProcess) -> None:
    """A ready base and fine-tune, a pending checkpoint, a policy and a queued merge run."""
    headers = {"Authorization": f"Bearer {server.tokens[0]}"}
    with httpx.Client(base_url=f"{server.url}/api/v1", headers=headers, timeout=30) as client:
        ids = []
        for seed, fields in ((0, {"kind": "base"}), (1, {"kind": "finetune", "task": "t"})):
            body = {"name": f"seed-{seed}", **fields}
            if ids:
                body["base_id"] = ids[0]
            created = client.post("/checkpoints", json=body).json()
            ids.append(created["id"])
            files = f"/checkpoints/{created['id']}/files/model.safetensors"
            assert client.put(files, content=st_bytes(tiny_state(seed))).status_code == 200
            done = client.post(f"/checkpoints/{created['id']}/complete", json={})
            assert done.status_code == 200, done.text
        assert client.post("/checkpoints", json={"name": "open", "kind": "base"}).is_success
        policy = {"name": "seeded", "method": "task_arithmetic", "selector": {"base_id": ids[0]}}
        assert client.post("/policies", json=policy).status_code == 201
        merge = {
            "method": "task_arithmetic",
            "base_id": ids[0],
            "inputs": [{"checkpoint_id": ids[1], "weight": 0.5}],
        }
        assert client.post("/merges", json=merge).status_code == 202


def test_schemathesis_finds_no_server_errors_or_schema_violations(tmp_path: Path) -> None:
    with registry_process(tmp_path / "home") as server:
        seed_objects(server)
        report = tmp_path / "report.json"
        command = [
            *(sys.executable, "-m", "schemathesis.cli", "run"),
            f"{server.url}/api/v1/openapi.json",
            *("--header", f"Authorization: Bearer {server.tokens[0]}"),
            *("--checks", CHECKS),
            *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED)),
            # One worker: Hypothesis parsing lambdas in two threads at once trips CPython
            # 3.11's "AST constructor recursion depth mismatch" (a tester error, not ours).
            *("--workers", "1", "--no-shrink", "--request-timeout", "30"),
            *("--report", "json", "--report-json-path", str(report)),
            "--exclude-path-regex",
            "^/api/v1/admin/",  # needs an admin token; covered by its own tests
        ]
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        log = server.log.read_text()
    assert report.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(report.read_text())
    cases = result["test_cases"]
    print(
        f"\nschemathesis: {result['operations']['tested']} operations, "
        f"{cases['generated']} cases, {cases['with_failures']} with failures, "
        f"phases { ({k: v['status'] for k, v in result['phases'].items()}) }"
    )
    assert result["failures"] == [] and result["errors"] == [], run.stdout[-8000:]
    assert run.returncode == 0, run.stdout[-8000:]
    assert cases["generated"] >= 300
    assert result["operations"]["tested"] >= 25
    assert result["phases"]["stateful"]["status"] == "success"
    assert "Traceback" not in log, log[-4000:]
