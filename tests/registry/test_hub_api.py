"""The Hub-compatible read API: ``huggingface_hub``, ``transformers`` and ``peft`` themselves, run
with ``HF_ENDPOINT=<registry>/hub`` in a fresh process, load registered checkpoints unchanged;
plus the headers, ranges and error codes those clients rely on, and read tokens."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from registry.client.api import Client
from registry.services.hub import revision_sha
from tests.registry.conftest import LiveRegistry, _tokens
from tests.registry.hf_tiny import save_tiny_adapter, save_tiny_model
from tests.services import free_port

LOADS = """
import hashlib, json, os, sys, torch, huggingface_hub, transformers, peft
ids = torch.tensor([[3, 4, 5, 6, 7]])
folder = huggingface_hub.snapshot_download(repo_id="ckreg/tiny-hub")
files = {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
         for n in sorted(os.listdir(folder))}
model = transformers.AutoModelForCausalLM.from_pretrained("ckreg/tiny-hub")
tokenizer = transformers.AutoTokenizer.from_pretrained("ckreg/tiny-hub")
base = transformers.AutoModelForCausalLM.from_pretrained("ckreg/tiny-hub")
adapted = peft.PeftModel.from_pretrained(base, "ckreg/" + sys.argv[1])
with torch.no_grad():
    out = {"files": files, "tokens": tokenizer("the cat sat")["input_ids"],
           "logits": model(ids).logits.sum().item(), "adapted": adapted(ids).logits.sum().item()}
print(json.dumps(out))
"""


def hf_process(script: str, url: str, home: Path, *args: str, token: str | None = None) -> str:
    env = {
        **os.environ,
        "HF_ENDPOINT": f"{url}/hub",
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-c", script, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hub")
    base = save_tiny_model(root / "tiny-hub", seed=5)
    return base, save_tiny_adapter(root / "tiny-lora", base)


@pytest.fixture(scope="module")
def registered(live_registry: LiveRegistry, folders: tuple[Path, Path]) -> tuple[dict, dict]:
    with Client(live_registry.url, token=live_registry.token) as client:
        base = client.register(folders[0], kind="base", progress=False)
        adapter = client.register(folders[1], base_id=base["id"], progress=False)
    return base, adapter


def test_huggingface_tools_load_from_the_registry(
    live_registry: LiveRegistry,
    registered: tuple[dict, dict],
    folders: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = registered
    out = json.loads(
        hf_process(LOADS, live_registry.url, tmp_path, str(adapter["id"])).splitlines()[-1]
    )
    assert out["files"] == {f["name"]: f["sha256"] for f in base["files"]}
    assert out["tokens"] == [3, 4, 5]
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    local = AutoModelForCausalLM.from_pretrained(folders[0])
    with torch.no_grad():
        assert out["logits"] == pytest.approx(local(ids).logits.sum().item(), rel=1e-6)
        adapted = PeftModel.from_pretrained(local, folders[1])(ids).logits.sum().item()
    assert out["adapted"] == pytest.approx(adapted, rel=1e-6)
    assert out["adapted"] != pytest.approx(out["logits"], rel=1e-6)  # the adapter did something


def test_model_info_resolve_headers_and_ranges(
    live_registry: LiveRegistry, registered: tuple[dict, dict]
) -> None:
    base, _ = registered
    hub = f"{live_registry.url}/hub"
    info = httpx.get(f"{hub}/api/models/ckreg/{base['id']}/revision/main").json()
    by_name = {f["name"]: f for f in base["files"]}
    assert info["id"] == "ckreg/tiny-hub" and len(info["sha"]) == 40
    assert {s["rfilename"]: (s["size"], s["lfs"]["sha256"]) for s in info["siblings"]} == {
        n: (f["size"], f["sha256"]) for n, f in by_name.items()
    }
    weights = by_name["model.safetensors"]
    url = f"{hub}/ckreg/tiny-hub/resolve/{info['sha']}/model.safetensors"
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.headers["ETag"] == f'"{weights["sha256"]}"'
    assert head.headers["X-Repo-Commit"] == info["sha"]
    assert int(head.headers["Content-Length"]) == weights["size"]
    whole = httpx.get(url).content
    assert hashlib.sha256(whole).hexdigest() == weights["sha256"]
    part = httpx.get(url, headers={"Range": "bytes=8-15"})
    assert (part.status_code, part.content) == (206, whole[8:16])
    assert part.headers["Content-Range"] == f"bytes 8-15/{weights['size']}"


def test_not_found_answers_carry_hub_error_codes(
    live_registry: LiveRegistry, registered: tuple[dict, dict]
) -> None:
    hub = f"{live_registry.url}/hub"
    missing = httpx.head(f"{hub}/ckreg/tiny-hub/resolve/main/pytorch_model.bin")
    assert (missing.status_code, missing.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert len(missing.headers["X-Repo-Commit"]) == 40
    no_repo = httpx.get(f"{hub}/api/models/ckreg/nothing-here")
    assert (no_repo.status_code, no_repo.headers["X-Error-Code"]) == (404, "RepoNotFound")
    other_ns = httpx.get(f"{hub}/api/models/someone/tiny-hub")
    assert other_ns.headers["X-Error-Code"] == "RepoNotFound"
    bad_rev = httpx.get(f"{hub}/api/models/ckreg/tiny-hub/revision/{'0' * 40}")
    assert (bad_rev.status_code, bad_rev.headers["X-Error-Code"]) == (404, "RevisionNotFound")
    tree = httpx.get(f"{hub}/api/models/ckreg/tiny-hub/tree/main", params={"recursive": True})
    base, _ = registered
    assert [e["path"] for e in tree.json()] == sorted(f["name"] for f in base["files"])


def test_revision_is_a_content_hash() -> None:
    from registry.models import Artifact

    def files(digest: str) -> list[Artifact]:
        return [
            Artifact(
                checkpoint_id=1, role="config", name="a.json", blob_key="k", sha256=digest, size=1
            ),
            Artifact(
                checkpoint_id=1, role="config", name="b.json", blob_key="k", sha256="1" * 64, size=1
            ),
        ]

    assert revision_sha(files("0" * 64)) == revision_sha(list(reversed(files("0" * 64))))
    assert revision_sha(files("0" * 64)) != revision_sha(files("2" * 64))


@contextmanager
def auth_registry(home: Path) -> Iterator[tuple[str, str, str]]:
    """A registry that needs a read token for reads, in a thread: ``(url, write, read)``."""
    import uvicorn

    from registry.api.app import create_app
    from registry.db import upgrade_database
    from registry.settings import Settings

    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'registry.db'}",
        store_url=f"file://{home / 'store'}",
        auth_reads=True,
        task_vectors_on_complete=False,
    )
    upgrade_database(settings.database_url)
    write, read = _tokens(settings.database_url)
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "auth registry did not start"
    try:
        yield f"http://127.0.0.1:{port}", write, read
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_read_tokens_are_honoured(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # localhost only
    with auth_registry(tmp_path / "registry") as (url, write, read):
        with Client(url, token=write) as client:
            client.register(folders[0], kind="base", name="tiny-auth", progress=False)
        assert httpx.get(f"{url}/hub/api/models/ckreg/tiny-auth").status_code == 401
        options = {"repo_id": "ckreg/tiny-auth", "endpoint": f"{url}/hub"}
        with pytest.raises(RepositoryNotFoundError):
            huggingface_hub.snapshot_download(**options, token=False, cache_dir=tmp_path / "a")
        wrong = huggingface_hub.HfApi(endpoint=f"{url}/hub", token="ckreg_not-a-token")
        with pytest.raises(RepositoryNotFoundError):
            wrong.model_info("ckreg/tiny-auth")
        folder = huggingface_hub.snapshot_download(**options, token=read, cache_dir=tmp_path / "b")
    assert "model.safetensors" in os.listdir(folder)
