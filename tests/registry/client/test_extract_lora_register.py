"""``ckreg extract-lora --register``: the extracted adapter lands in a live registry as kind
adapter of its base (typer CliRunner on the ckreg app, real server over HTTP)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from tests.registry.conftest import LiveRegistry

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny_pair(root: Path) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(root / "base"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(torch.ones(16, 1) @ torch.ones(1, 16))
    model.save_pretrained(str(root / "tuned"))
    return root / "base", root / "tuned"


def test_extract_lora_register(live_registry: LiveRegistry, tmp_path: Path) -> None:
    from flows.cli import app
    from registry.client.api import Client

    base, tuned = _tiny_pair(tmp_path)
    with Client(live_registry.url, token=live_registry.token) as client:
        base_id = client.register(base, name="xl-base", kind="base", progress=False)["id"]
    args = ["extract-lora", "--base", str(base), "--model", str(tuned), "--out", str(tmp_path / "ad"),
            "--no-progress", "--register", "--base-id", str(base_id), "--name", "xl-adapter",
            "--registry-url", live_registry.url, "--token", live_registry.token]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    match = re.search(r"registered adapter (\d+) \(xl-adapter\)", result.output)
    assert match, result.output
    with Client(live_registry.url, token=live_registry.token) as client:
        shown = client.get_checkpoint(int(match.group(1)))
    assert (shown["kind"], shown["base_id"], shown["status"]) == ("adapter", base_id, "ready")
    files = {f["name"] for f in shown.get("files", [])}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
