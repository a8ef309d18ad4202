"""``ckreg pull`` (the real command, in-process) / ``Client.pull``: a whole checkpoint into a folder ``from_pretrained`` loads;
sha256-checked, resumed with Range from a ``.partial`` file, keeping files already there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from registry.client.api import Client, ClientError
from registry.client.pull import PullError
from tests.registry.conftest import LiveRegistry
from tests.registry.hf_tiny import save_tiny_model


@pytest.fixture(scope="module")
def client(live_registry: LiveRegistry) -> Client:
    return Client(live_registry.url, token=live_registry.token)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("pull") / "tiny-pull", seed=3)


@pytest.fixture(scope="module")
def registered(client: Client, source: Path) -> dict:
    return client.register(source, kind="base", progress=False)


def test_cli_pull_by_name_loads_with_from_pretrained(
    live_registry: LiveRegistry, registered: dict, source: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = tmp_path / "pulled"
    args = ["pull", "tiny-pull", str(dest), "-q", "--url", live_registry.url]
    done = CliRunner().invoke(app, [*args, "--token", live_registry.token])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == str(dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f["name"] for f in registered["files"])
    model = AutoModelForCausalLM.from_pretrained(dest)
    original = load_file(str(source / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in original:
            assert torch.equal(tensor, original[name]), name
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert tokenizer("the cat sat")["input_ids"] == [3, 4, 5]


def test_resume_continues_partial_with_range(
    client: Client, registered: dict, source: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "resume"
    dest.mkdir()
    weights = (source / "model.safetensors").read_bytes()
    (dest / "model.safetensors.partial").write_bytes(weights[: len(weights) // 2])
    (dest / "config.json").write_bytes((source / "config.json").read_bytes())
    os.utime(dest / "config.json", (1_000_000, 1_000_000))
    client.pull(registered["id"], dest, progress=False, workers=2)
    assert (dest / "model.safetensors").read_bytes() == weights
    assert not (dest / "model.safetensors.partial").exists()
    assert (dest / "config.json").stat().st_mtime == 1_000_000  # right hash: kept, not fetched


def test_corrupt_partial_is_caught_by_sha256_and_removed(
    client: Client, registered: dict, source: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "corrupt"
    dest.mkdir()
    half = len((source / "model.safetensors").read_bytes()) // 2
    (dest / "model.safetensors.partial").write_bytes(b"\0" * half)  # continued, not refetched
    with pytest.raises(PullError, match=r"'model\.safetensors'.*hash to"):
        client.pull("tiny-pull", dest, progress=False)
    assert not (dest / "model.safetensors.partial").exists()
    assert not (dest / "model.safetensors").exists()
    client.pull("tiny-pull", dest, progress=False)  # a second pull starts clean and succeeds
    assert (dest / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_missing_names_and_files_say_what_is_there(client: Client, registered: dict) -> None:
    with pytest.raises(PullError, match="no ready checkpoint is named 'no-such-model'"):
        client.pull("no-such-model", "unused", progress=False)
    with pytest.raises(
        ClientError,
        match=r"has no file 'model-00001-of-00002\.safetensors'; files: config\.json, generation_config\.json, model\.safetensors",
    ):
        client.download_file(
            registered["id"], "model-00001-of-00002.safetensors", "x", progress=False
        )
