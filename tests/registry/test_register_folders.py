"""Folders in whole: ``ckreg register DIR`` uploads every file of a Trainer / model / PEFT folder,
skips training state with one line, and turns a Trainer's ``optimizer.pt`` into second moments
named through ``config.json`` (checked against the live optimizer of a real ``Trainer.train()``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.client.api import Client, ClientError
from registry.client.capture import CaptureError
from registry.client.layouts import plan_upload
from registry.client.trainer_moments import side_artifacts
from tests.registry.conftest import LiveRegistry
from tests.registry.hf_tiny import REFERENCE_MOMENTS, save_tiny_model, train_tiny

TRAINING_STATE_LINE = (
    "skipped optimizer.pt, rng_state.pth, scheduler.pt, trainer_state.json, training_args.bin "
    "(training state; --include-training-state to keep)"
)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.getbasetemp() / "hf-tiny-trainer")


@pytest.fixture(scope="module")
def client(live_registry: LiveRegistry) -> Client:
    return Client(live_registry.url, token=live_registry.token)


def ckreg(live: LiveRegistry, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``ckreg`` command, as a user runs it."""
    command = [
        str(Path(sys.executable).parent / "ckreg"),
        *args,
        "--url",
        live.url,
        "--token",
        live.token,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_trainer_folder_via_cli(
    live_registry: LiveRegistry, client: Client, checkpoint_dir: Path, tmp_path: Path
) -> None:
    done = ckreg(live_registry, "register", str(checkpoint_dir), "--kind", "base", "-q")
    assert done.returncode == 0, done.stderr
    assert TRAINING_STATE_LINE in done.stderr.splitlines()
    match = re.search(r"registered checkpoint (\d+)", done.stdout)
    assert match, done.stdout
    checkpoint = client.get_checkpoint(int(match.group(1)))
    assert (checkpoint["step"], checkpoint["metadata"]["layout"]) == (2, "trainer/single")
    assert sorted(f["name"] for f in checkpoint["files"]) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    [artifact] = client.artifacts(checkpoint["id"])
    assert artifact["role"] == "second_moment"
    path = client.download_artifact(checkpoint["id"], artifact["id"], tmp_path, progress=False)
    captured = load_file(str(path))
    reference = load_file(str(checkpoint_dir.parent / REFERENCE_MOMENTS))
    assert set(captured) == set(reference) and len(reference) == 20  # tied: no lm_head
    for name, moment in reference.items():
        assert torch.equal(captured[name], moment), name


def test_include_training_state(client: Client, checkpoint_dir: Path) -> None:
    checkpoint = client.register(
        checkpoint_dir, kind="base", name="with-state", include_training_state=True, progress=False
    )
    names = {f["name"] for f in checkpoint["files"]}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names


def test_optimizer_that_fits_no_layout_is_refused_before_upload(
    client: Client, checkpoint_dir: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(checkpoint_dir, tmp_path / "checkpoint-2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 24}))
    before = client.list_checkpoints(name="checkpoint-2", status="pending")["total"]
    with pytest.raises(CaptureError, match=r"mlp\.gate_proj\.weight' has shape \(24, 16\)"):
        client.register(folder, kind="base", progress=False)
    assert client.list_checkpoints(name="checkpoint-2", status="pending")["total"] == before


def test_model_folder_extras_and_skips(client: Client, tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "tiny")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "runs").mkdir()
    moments = {k: v.abs() for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(moments, str(folder / "second_moment.safetensors"))
    plan = plan_upload(folder)
    assert plan.notes == [
        "skipped .gitattributes (hidden or not a plain file name)",
        "skipped pytorch_model.bin (not safetensors; pickled weights are never uploaded)",
        "skipped runs/ (subfolder; only top-level files are registered)",
    ]
    checkpoint = client.register(folder, kind="base", name="tiny-extras", progress=False)
    assert [f["name"] for f in checkpoint["files"]] == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [a["role"] for a in client.artifacts(checkpoint["id"])] == ["second_moment"]


def test_optimizer_of_adapter_or_unknown_model_is_not_guessed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "checkpoint-9"
    folder.mkdir()
    save_file({"a.lora_A.weight": torch.ones(1, 2)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text("{}")
    torch.save({"state": {}, "param_groups": [{"params": [0]}]}, folder / "optimizer.pt")
    plan = plan_upload(folder)
    with caplog.at_level("WARNING", logger="registry.client"):
        found = side_artifacts(
            plan, second_moment=None, optimizer_param_names=None, work_dir=tmp_path
        )
    assert found == []
    assert "optimizer.pt not converted to second moments (an adapter)" in caplog.text
    (folder / "adapter_model.safetensors").rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "my-own-net"}))
    with caplog.at_level("WARNING", logger="registry.client"):
        found = side_artifacts(
            plan_upload(folder), second_moment=None, optimizer_param_names=None, work_dir=tmp_path
        )
    assert (
        found == [] and "optimizer.pt not converted to second moments: cannot read" in caplog.text
    )


def test_unsafe_file_names_are_refused_by_the_server(client: Client, tmp_path: Path) -> None:
    pending = client.create_checkpoint(name="names", kind="base")
    (tmp_path / "x.json").write_text("{}")
    for bad in ("../x.json", "sub/x.json", ".hidden"):
        with pytest.raises(ClientError, match=r"invalid file name|not_found"):
            client.upload_file(pending["id"], tmp_path / "x.json", name=bad, progress=False)
