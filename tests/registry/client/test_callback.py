"""``CkregCallback`` with a real ``Trainer.train()`` on a tiny Llama (built from a config, no
hub): every saved checkpoint lands in a real registry with step, loss, eval metrics, second
moments, run and base; with the registry down training finishes and one line says so."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from registry.client import Client
from tests.registry.conftest import LiveRegistry
from tests.services import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 48


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """Fixed random token rows; labels = inputs (causal LM)."""

    def __init__(self, rows: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (rows, 12), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def train(output_dir: Path, callback: Any, *, steps: int = 4, run_name: str = "r1") -> Any:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        run_name=run_name,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=1,  # rotation deletes checkpoint-2 while it may still be uploading
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Tokens(16, 0),
        eval_dataset=Tokens(8, 1),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def base_id(live_registry: LiveRegistry, tmp_path_factory: pytest.TempPathFactory) -> int:
    folder = tmp_path_factory.mktemp("llama-base")
    tiny_llama().save_pretrained(folder)
    with Client(live_registry.url, token=live_registry.token) as client:
        return int(client.register(folder, kind="base", name="llama-base", progress=False)["id"])


def test_trainer_checkpoints_are_registered(
    live_registry: LiveRegistry, base_id: int, tmp_path: Path
) -> None:
    from registry.client.integrations import CkregCallback

    callback = CkregCallback(base_id, url=live_registry.url, token=live_registry.token, task="lm")
    train(tmp_path / "out", callback, run_name="r1")
    assert [c["name"] for c in callback.registered] == ["r1-step2", "r1-step4"]
    assert not (tmp_path / "out" / ".ckreg-staging").exists()
    with Client(live_registry.url, token=live_registry.token) as client:
        page = client.list_checkpoints(run="r1", base_id=base_id)
        by_step = {c["step"]: c for c in page["items"]}
        assert sorted(by_step) == [2, 4]
        for step, checkpoint in by_step.items():
            assert checkpoint["name"] == f"r1-step{step}"
            assert (checkpoint["kind"], checkpoint["task"], checkpoint["status"]) == (
                "finetune",
                "lm",
                "ready",
            )
            metrics = {m["name"]: m for m in client.metrics(checkpoint["id"])}
            assert {"loss", "eval_loss"} <= set(metrics), metrics
            assert metrics["loss"]["step"] == step and 0 < metrics["eval_loss"]["value"] < 10
            roles = {a["role"] for a in client.artifacts(checkpoint["id"])}
            assert "second_moment" in roles
        files = {f["name"] for f in client.get_checkpoint(by_step[4]["id"])["files"]}
        assert {"model.safetensors", "config.json"} <= files


def test_registry_down_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from registry.client.integrations import CkregCallback

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    callback = CkregCallback(1, url=url, token="t", attempts=2, backoff_s=0.05, flush_timeout_s=30)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="registry.client.integrations"):
        trainer = train(tmp_path / "out", callback, run_name="down")
    assert trainer.state.global_step == 4
    assert time.monotonic() - started < 120
    assert callback.registered == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "registry.client.integrations"]
    unreachable = [w for w in warnings if "unreachable" in w]
    assert len(unreachable) == 1 and url in unreachable[0], warnings
    assert any("2 checkpoint(s) not registered" in w and "down-step4" in w for w in warnings)
    assert (tmp_path / "out" / "checkpoint-4" / "model.safetensors").is_file()


def test_integrations_package_does_not_import_transformers() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, registry.client.integrations as i; "
        "print('transformers' in sys.modules, i.__all__)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "False ['CkregCallback']", done.stderr


def test_full_queue_and_flush_never_block(tmp_path: Path) -> None:
    """A down registry with long backoff: submits return at once (extra ones are dropped) and
    the flush gives up after its bound."""
    from safetensors.torch import save_file

    from registry.client.integrations.uploader import (
        BackgroundRegistrar,
        RegistrationJob,
        RetryPolicy,
    )

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    url = f"http://127.0.0.1:{free_port()}"
    registrar = BackgroundRegistrar(
        lambda: Client(url), url=url, queue_size=1, retry=RetryPolicy(attempts=3, backoff_s=30)
    )
    accepted = []
    for step in range(3):
        started = time.monotonic()
        accepted.append(registrar.submit(RegistrationJob(tmp_path, {"name": f"s{step}"})))
        assert time.monotonic() - started < 0.5
    assert accepted.count(False) >= 1
    started = time.monotonic()
    assert registrar.flush(0.5) is False
    assert time.monotonic() - started < 5  # the backoff wait is cut short, not slept out
    assert sorted(registrar.failed) == ["s0", "s1", "s2"]
