"""A tiny LM zoo end to end through the flows: Hugging Face directories (one sharded) and PEFT
adapters uploaded over REST, merged by the embedded flows (full weights, a sharded input,
adapters as full weights and as an adapter), and every merged output loaded back with
``AutoModelForCausalLM.from_pretrained`` (or PEFT) and used to generate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import mergeops
from bench.lmzoo.build import build_lm_zoo
from bench.lmzoo.evaluator import LMTasksEvaluator, load_hf_dir
from bench.lmzoo.manifest import LMZooManifest
from bench.lmzoo.model import generate
from bench.lmzoo.train import LMTrainConfig
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded

TINY = LMTrainConfig(
    hidden=32, heads=2, pool=100, batch_size=16, pretrain_steps=20, finetune_steps=8,
    lora_steps=6, lora_rank=4, trajectory_points=2, fisher_examples=4, irrelevant=0,
    shard_size="20KB",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LMZooManifest]:
    out = tmp_path_factory.mktemp("lmzoo")
    manifest = build_lm_zoo(out, seed=0, tasks=["copy", "reverse"], config=TINY, log=lambda _: None)
    return out, manifest


def _upload_dir(embedded: Embedded, folder: Path, **fields: Any) -> int:
    """Register a checkpoint folder over REST: create, PUT every file, complete."""
    api, headers = embedded.client, embedded.headers
    created = api.post("/api/v1/checkpoints", json=fields, headers=headers)
    assert created.status_code == 201, created.text
    checkpoint_id = created.json()["id"]
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        put = api.put(
            f"/api/v1/checkpoints/{checkpoint_id}/files/{path.name}",
            content=path.read_bytes(),
            headers={**headers, "Content-Type": "application/octet-stream"},
        )
        assert put.status_code == 200, put.text
    done = api.post(f"/api/v1/checkpoints/{checkpoint_id}/complete", json={}, headers=headers)
    assert done.status_code == 200, done.text
    return int(checkpoint_id)


def _merge(embedded: Embedded, method: str, ids: list[int], **extra: Any) -> int:
    started = embedded.post_merge(method, ids, **extra)
    assert started.status_code == 202, started.text
    assert embedded.launcher.wait_idle(120), embedded.launcher.errors
    run = embedded.client.get(f"/api/v1/merges/{started.json()['id']}").json()
    assert run["status"] == "succeeded", run
    return int(run["output_checkpoint_id"])


def _download(embedded: Embedded, checkpoint_id: int, folder: Path) -> Path:
    folder.mkdir(parents=True)
    checkpoint = embedded.client.get(f"/api/v1/checkpoints/{checkpoint_id}").json()
    for file in checkpoint["files"]:
        got = embedded.client.get(f"/api/v1/checkpoints/{checkpoint_id}/files/{file['name']}")
        assert got.status_code == 200, got.text
        (folder / file["name"]).write_bytes(got.content)
    return folder


def test_tiny_zoo_layout(tiny_zoo: tuple[Path, LMZooManifest]) -> None:
    zoo, manifest = tiny_zoo
    sharded = zoo / manifest.tasks["reverse"].model
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert "lm_head.weight" not in load_hf_dir(zoo / manifest.base)  # tied embeddings
    adapter = zoo / manifest.tasks["copy"].adapter
    assert (adapter / "adapter_config.json").is_file()
    assert [p.step for p in manifest.tasks["copy"].trajectory] == [4, 8]
    metrics = LMTasksEvaluator(zoo, split="validation").evaluate(load_hf_dir(zoo / manifest.base))
    assert 0.0 <= metrics["accuracy/avg"] <= 1.0 and "normalized_accuracy/copy" in metrics


def test_flows_merge_hf_dirs_and_adapters(
    embedded: Embedded, tiny_zoo: tuple[Path, LMZooManifest], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zoo, manifest = tiny_zoo
    base = _upload_dir(embedded, zoo / manifest.base, name="lm-base", kind="base")
    tasks = {
        t: _upload_dir(
            embedded, zoo / e.model, name=f"ft-{t}", kind="finetune", base_id=base, task=t
        )
        for t, e in manifest.tasks.items()
    }
    adapters = {
        t: _upload_dir(embedded, zoo / e.adapter, name=f"lora-{t}", kind="adapter", base_id=base)
        for t, e in manifest.tasks.items()
    }
    outputs = {
        # full fine-tunes, one of them sharded
        "ties": _merge(embedded, "ties", list(tasks.values()), base_id=base, params={"density": 0.5}),
        # adapters with a base: merged as full weights (base + B·A)
        "adapter-full": _merge(
            embedded, "task_arithmetic", list(adapters.values()), base_id=base,
            params={"lambda": 0.5},
        ),
        # adapters without a base: merged as an adapter (A and B factors)
        "adapter": _merge(embedded, "linear", list(adapters.values())),
    }  # fmt: skip
    prompts = ["Cab1=", "Rabc="]
    reference = mergeops.merge(
        "ties", [str(zoo / e.model) for e in manifest.tasks.values()],
        base=str(zoo / manifest.base), model_names=list(manifest.tasks), density=0.5,
    )  # fmt: skip
    for label, checkpoint_id in outputs.items():
        folder = _download(embedded, checkpoint_id, tmp_path / label)
        if label == "adapter":
            assert (folder / "adapter_model.safetensors").is_file(), sorted(
                p.name for p in folder.iterdir()
            )
            base_model = AutoModelForCausalLM.from_pretrained(zoo / manifest.base)
            model = PeftModel.from_pretrained(base_model, folder).eval()
        else:
            assert (folder / "config.json").is_file(), sorted(p.name for p in folder.iterdir())
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
        answers = generate(model, prompts, max_new_tokens=6)
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
        if label == "ties":  # the flows' merge is the in-memory merge
            merged = load_hf_dir(folder)
            assert max(float((merged[k] - v).abs().max()) for k, v in reference.items()) < 1e-6
    evaluator = LMTasksEvaluator(zoo, split="test")
    adapter_state = load_hf_dir(tmp_path / "adapter")
    assert any(".lora_A." in k for k in adapter_state)
    assert 0.0 <= evaluator.evaluate(adapter_state)["accuracy/avg"] <= 1.0
    assert torch.is_tensor(next(iter(adapter_state.values())))
