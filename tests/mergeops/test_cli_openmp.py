"""``ckreg merge`` sets OMP_WAIT_POLICY=PASSIVE before torch loads (unless the user set one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import json, os, sys
from typer.testing import CliRunner
from flows.cli import app
loaded_before = "torch" in sys.modules
result = CliRunner().invoke(app, ["merge", "--config", sys.argv[1], "--out", sys.argv[2]])
print(json.dumps({"before": loaded_before, "after": "torch" in sys.modules,
                  "policy": os.environ.get("OMP_WAIT_POLICY"), "code": result.exit_code}))
"""


def _probe(tmp_path: Path, policy: str | None) -> dict[str, object]:
    config = tmp_path / "bad.yml"
    config.write_text("merge_method: linear\nmodels: []\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(config), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_merge_sets_passive_wait_policy_before_torch(
    tmp_path: Path, given: str | None, expected: str
) -> None:
    seen = _probe(tmp_path, given)
    assert seen["before"] is False  # torch not loaded by the CLI itself: the policy takes effect
    assert seen["after"] is True  # the merge command loaded it (after setting the policy)
    assert seen["policy"] == expected
    assert seen["code"] == 2  # the config is rejected with a clear error, not a traceback
