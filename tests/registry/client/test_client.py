"""The Python client against a real registry server (uvicorn, SQLite, file store) over HTTP."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry.client import Client, ClientError
from registry.client.capture import capture_second_moments
from tests.registry.conftest import LiveRegistry

SHAPES = {"layer.weight": (3, 2), "layer.bias": (3,), "head.weight": (2, 3)}


def model_file(path: Path, seed: int, *, names: tuple[str, ...] = tuple(SHAPES)) -> Path:
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.randn(SHAPES[name], generator=generator) for name in names}, str(path))
    return path


@pytest.fixture(scope="module")
def client(live_registry: LiveRegistry) -> Iterator[Client]:
    with Client(live_registry.url, token=live_registry.token) as c:
        yield c


@pytest.fixture(scope="module")
def base(client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = model_file(tmp_path_factory.mktemp("base") / "tiny-base.safetensors", seed=0)
    return client.register(path, kind="base", progress=False)


def test_register_single_file_and_download(client: Client, base: dict, tmp_path: Path) -> None:
    assert (base["status"], base["kind"], base["name"]) == ("ready", "base", "tiny-base")
    [file] = base["files"]
    source = model_file(tmp_path / "again.safetensors", seed=0)  # same bytes as the base
    assert file["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    target = client.download_file(
        base["id"], "tiny-base.safetensors", tmp_path / "out", progress=False
    )
    assert target == tmp_path / "out"
    assert target.read_bytes() == source.read_bytes()
    (tmp_path / "dir").mkdir()
    into_dir = client.download_file(
        base["id"], "tiny-base.safetensors", tmp_path / "dir", progress=False
    )
    assert into_dir == tmp_path / "dir" / "tiny-base.safetensors"


def test_register_trainer_checkpoint(client: Client, base: dict, tmp_path: Path) -> None:
    directory = tmp_path / "checkpoint-500"
    model_file(directory / "model.safetensors", seed=1)
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    state = {"global_step": 500, "log_history": [{"loss": 0.9}, {"loss": 0.42}, {"eval_loss": 0.5}]}
    (directory / "trainer_state.json").write_text(json.dumps(state))
    checkpoint = client.register(
        directory,
        base_id=base["id"],
        task="math",
        run="r1",
        tags=["nightly"],
        metrics={"acc": 0.81},
        progress=False,
    )
    assert (checkpoint["status"], checkpoint["step"], checkpoint["name"]) == (
        "ready",
        500,
        "checkpoint-500",
    )
    assert checkpoint["metadata"]["layout"] == "trainer/single"
    assert sorted(f["name"] for f in checkpoint["files"]) == ["config.json", "model.safetensors"]
    metrics = {m["name"]: m for m in client.metrics(checkpoint["id"])}
    assert metrics["loss"]["value"] == pytest.approx(0.42)
    assert metrics["loss"]["step"] == 500
    assert metrics["acc"]["value"] == pytest.approx(0.81)
    listed = client.list_checkpoints(base_id=base["id"], task="math", tag="nightly")
    assert [item["id"] for item in listed["items"]] == [checkpoint["id"]]
    lineage = client.lineage(checkpoint["id"])
    assert [(e["parent_id"], e["role"]) for e in lineage["ancestors"]] == [(base["id"], "base")]


def test_register_with_second_moment(client: Client, base: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(2, 3)
    model.head = torch.nn.Linear(3, 2, bias=False)
    optimizer = torch.optim.Adam(model.parameters())
    model.head(model.layer(torch.randn(4, 2))).sum().backward()
    optimizer.step()
    moments = capture_second_moments(model, optimizer, tmp_path / "second_moment.safetensors")
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "ft.safetensors"),
    )
    checkpoint = client.register(
        tmp_path / "ft.safetensors",
        base_id=base["id"],
        task="code",
        second_moment=moments,
        progress=False,
    )
    [artifact] = [a for a in client.artifacts(checkpoint["id"]) if a["role"] == "second_moment"]
    assert artifact["sha256"] == hashlib.sha256(moments.read_bytes()).hexdigest()
    copy = client.download_artifact(
        checkpoint["id"], artifact["id"], tmp_path / "copy.safetensors", progress=False
    )
    assert copy.read_bytes() == moments.read_bytes()


def test_optimizer_file_converted_only_with_names(
    client: Client, base: dict, tmp_path: Path
) -> None:
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(2, 3)
    model.head = torch.nn.Linear(3, 2, bias=False)
    optimizer = torch.optim.Adam(model.parameters())
    model.head(model.layer(torch.randn(4, 2))).sum().backward()
    optimizer.step()
    directory = tmp_path / "checkpoint-7"
    directory.mkdir()
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(directory / "model.safetensors"),
    )
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 7, "log_history": []}))
    plain = client.register(directory, base_id=base["id"], name="no-moments", progress=False)
    assert client.artifacts(plain["id"]) == [] or all(
        a["role"] != "second_moment" for a in client.artifacts(plain["id"])
    )
    names = [name for name, _ in model.named_parameters()]
    converted = client.register(
        directory, base_id=base["id"], optimizer_param_names=names, progress=False
    )
    roles = [a["role"] for a in client.artifacts(converted["id"])]
    assert "second_moment" in roles


def test_register_sharded(client: Client, base: dict, tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    model_file(
        directory / "model-00001-of-00002.safetensors", seed=2, names=("layer.weight", "layer.bias")
    )
    model_file(directory / "model-00002-of-00002.safetensors", seed=2, names=("head.weight",))
    weight_map = {
        "layer.weight": "model-00001-of-00002.safetensors",
        "layer.bias": "model-00001-of-00002.safetensors",
        "head.weight": "model-00002-of-00002.safetensors",
    }
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    checkpoint = client.register(directory, base_id=base["id"], task="chat", progress=False)
    assert checkpoint["status"] == "ready"
    assert checkpoint["metadata"]["layout"] == "sharded"
    assert len(checkpoint["files"]) == 3


def test_register_adapter(client: Client, base: dict, tmp_path: Path) -> None:
    directory = tmp_path / "lora"
    directory.mkdir()
    lora = {"layer.lora_A.weight": torch.randn(1, 2), "layer.lora_B.weight": torch.zeros(3, 1)}
    save_file(lora, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 2}))
    checkpoint = client.register(directory, base_id=base["id"], progress=False)
    assert (checkpoint["kind"], checkpoint["status"]) == ("adapter", "ready")
    assert client.list_checkpoints(kind="adapter")["total"] >= 1


def test_health(client: Client) -> None:
    assert client.health() == {"status": "ok"}


def test_server_errors_carry_status_and_message(
    client: Client, live_registry: LiveRegistry, tmp_path: Path
) -> None:
    with pytest.raises(ClientError) as missing:
        client.get_checkpoint(999_999)
    assert missing.value.status == 404
    with Client(live_registry.url) as anonymous, pytest.raises(ClientError) as unauth:
        anonymous.create_checkpoint(name="x")
    assert unauth.value.status == 401
    with (
        Client(live_registry.url, token=live_registry.read_token) as reader,
        pytest.raises(ClientError) as forbidden,
    ):
        reader.create_checkpoint(name="x")
    assert forbidden.value.status == 403
    assert "write" in forbidden.value.message


def test_server_rejects_corrupt_and_nonfinite_uploads(
    client: Client, base: dict, tmp_path: Path
) -> None:
    header = json.dumps(
        {"layer.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    ).encode()
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    pending = client.create_checkpoint(name="bad")
    client.upload_file(pending["id"], corrupt, progress=False)
    with pytest.raises(ClientError) as info:
        client.complete(pending["id"])
    assert info.value.status == 422
    assert "bad.safetensors" in info.value.message and "layer.weight" in info.value.message
    nan = tmp_path / "nan.safetensors"
    save_file({"layer.weight": torch.tensor([1.0, float("nan")])}, str(nan))
    pending = client.create_checkpoint(name="nan")
    client.upload_file(pending["id"], nan, progress=False)
    with pytest.raises(ClientError, match=r"layer\.weight"):
        client.complete(pending["id"])
    assert client.get_checkpoint(pending["id"])["status"] != "ready"


def test_similar_and_delete(client: Client, base: dict, tmp_path: Path) -> None:
    first = client.register(
        model_file(tmp_path / "a.safetensors", seed=5),
        base_id=base["id"],
        task="t1",
        progress=False,
    )
    second = client.register(
        model_file(tmp_path / "b.safetensors", seed=6),
        base_id=base["id"],
        task="t2",
        progress=False,
    )
    ranked = client.similar(first["id"])
    assert second["id"] in [row["checkpoint_id"] for row in ranked]
    assert all(-1.0 <= row["cosine"] <= 1.0 for row in ranked)
    deleted = client.delete(second["id"])
    assert deleted["status"] == "deleted"


def test_policies_and_ad_hoc_merges(client: Client, base: dict, tmp_path: Path) -> None:
    """Policy and merge calls round-trip (this server has no launcher: runs stay queued)."""
    ft = client.register(model_file(tmp_path / "m1.safetensors", 11), base_id=base["id"], task="t")
    policy = client.create_policy(
        name="client-ta",
        method="task_arithmetic",
        params={"lambda": 0.5},
        selector={"base_id": base["id"], "window": "newest_per_task"},
        trigger="manual",
    )
    assert policy["name"] == "client-ta" and not policy["cron"]
    assert "client-ta" in [p["name"] for p in client.policies()]
    run = client.merge("linear", {ft["id"]: 1.0, base["id"]: 1.0})
    assert run["status"] == "queued" and [i["weight"] for i in run["inputs"]] == [1.0, 1.0]
    again = client.merge("linear", {ft["id"]: 1.0, base["id"]: 1.0})
    assert again["id"] == run["id"]
    assert client.merge_run(run["id"])["method"] == "linear"
    assert run["id"] in [r["id"] for r in client.merge_runs()]
    with pytest.raises(TimeoutError, match=f"merge run {run['id']} still queued"):
        client.wait_for_merge(run["id"], timeout=0.3)
    with pytest.raises(ClientError) as refused:
        client.merge("tiez", [ft["id"]])
    assert refused.value.status == 422 and "tiez" in refused.value.message
