"""``ckreg moe build --register``: the MoE lands in the registry with lineage to every expert."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.mergeops import moe_tiny
from tests.registry.conftest import LiveRegistry


def _register(live: LiveRegistry, path: Path, kind: str, base: int | None = None) -> int:
    args = [
        "register",
        str(path),
        "--kind",
        kind,
        "--quiet",
        "--url",
        live.url,
        "--token",
        live.token,
    ]
    result = CliRunner().invoke(app, [*args, *(["--base", str(base)] if base else [])])
    assert result.exit_code == 0, result.output
    return next(int(line) for line in result.output.split() if line.isdigit())


def test_build_register_links_every_expert(live_registry: LiveRegistry, tmp_path: Path) -> None:
    base = moe_tiny.llama(0)
    base_id = _register(
        live_registry, moe_tiny.save(base, tmp_path / "base") / "model.safetensors", "base"
    )
    ids = []
    for seed in (1, 2):
        folder = moe_tiny.save(moe_tiny.nudged(base, seed, 0.05), tmp_path / f"ft{seed}")
        ids.append(_register(live_registry, folder / "model.safetensors", "finetune", base_id))
    spec = {
        "base_model": "base",
        "base_checkpoint_id": base_id,
        "gate_mode": "random",
        "experts": [
            {"source_model": f"ft{s}", "checkpoint_id": i} for s, i in zip((1, 2), ids, strict=True)
        ],
    }
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    args = [
        "moe",
        "build",
        "-c",
        str(tmp_path / "moe.yml"),
        "-o",
        str(tmp_path / "moe"),
        "--register",
    ]
    args += ["--registry-url", live_registry.url, "--token", live_registry.token]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    moe_id = int(result.output.split("registered MoE ")[1].split()[0])
    headers = {"Authorization": f"Bearer {live_registry.token}"}
    lineage = httpx.get(
        f"{live_registry.url}/api/v1/checkpoints/{moe_id}/lineage", headers=headers
    ).json()
    parents = {(e["parent_id"], e["role"]) for e in lineage["ancestors"] if e["child_id"] == moe_id}
    assert parents == {(ids[0], "input"), (ids[1], "input"), (base_id, "base")}
    shown = httpx.get(f"{live_registry.url}/api/v1/checkpoints/{moe_id}", headers=headers).json()
    assert shown["metadata"]["moe"]["experts_per_layer"] == 2 and shown["kind"] == "merged"
    del spec["experts"][1]["checkpoint_id"]
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(spec))
    args[5] = str(tmp_path / "moe-2")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "missing on expert(s) [1]" in refused.output
    assert not (tmp_path / "moe-2").exists()


def test_compress_register_is_a_child_with_metrics(
    live_registry: LiveRegistry, tmp_path: Path
) -> None:
    import json

    source = moe_tiny.save(moe_tiny.mixtral(4), tmp_path / "mixtral")
    source_id = _register(live_registry, source, "base")
    (tmp_path / "calib.json").write_text(json.dumps([[1, 2, 3, 4], [5, 6, 7]]))
    args = ["moe", "compress", str(source), "-o", str(tmp_path / "small"), "-m", "2"]
    args += ["--calibration", str(tmp_path / "calib.json"), "--register", str(source_id)]
    args += ["--registry-url", live_registry.url, "--token", live_registry.token]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    child = int(result.output.split("registered ")[1].split()[0])
    headers = {"Authorization": f"Bearer {live_registry.token}"}
    url = f"{live_registry.url}/api/v1/checkpoints/{child}"
    lineage = httpx.get(f"{url}/lineage", headers=headers).json()
    assert {(e["parent_id"], e["role"]) for e in lineage["ancestors"]} == {(source_id, "input")}
    metrics = httpx.get(f"{url}/metrics", headers=headers).text
    assert "moe/experts_after" in metrics and "moe/bytes_saved_fraction" in metrics
    assert httpx.get(url, headers=headers).json()["metadata"]["moe"]["experts_per_layer"] == 2
