"""``ckreg register --gram``: a fine-tune's layer-input Grams land as a ``gram`` artifact
(checked against the checkpoint's 2-D weights) through the real CLI and server."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from registry.client import Client
from registry.client.capture import capture_gram
from tests.registry.client.test_cli import invoke, registered_id
from tests.registry.conftest import LiveRegistry


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path))
    return path


def _register(live: LiveRegistry, path: Path, *args: str) -> tuple[int, str]:
    return invoke(live, "register", str(path), *args)


def test_register_with_gram_stores_a_gram_artifact(live_registry: LiveRegistry, tmp_path: Path):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(2, 4))
    code, out = _register(live_registry, _save(base, tmp_path / "b.safetensors"),
                          "--kind", "base", "--name", "gram-base")  # fmt: skip
    assert code == 0, out
    finetune = torch.nn.Sequential(torch.nn.Linear(2, 4))
    gram = capture_gram(finetune, [torch.randn(5, 2)], tmp_path / "gram.safetensors")
    code, out = _register(live_registry, _save(finetune, tmp_path / "ft.safetensors"),
                          "--base", str(registered_id(out)), "--name", "gram-ft",
                          "--gram", str(gram))  # fmt: skip
    assert code == 0, out
    with Client(live_registry.url, token=live_registry.token) as client:
        artifacts = client.artifacts(registered_id(out))
    assert ("gram", "gram.safetensors") in [(a["role"], a["name"]) for a in artifacts]


def test_a_gram_that_fits_no_weight_is_refused(live_registry: LiveRegistry, tmp_path: Path):
    base = torch.nn.Sequential(torch.nn.Linear(2, 4))
    code, out = _register(live_registry, _save(base, tmp_path / "b.safetensors"),
                          "--kind", "base", "--name", "gram-base-2")  # fmt: skip
    bad = tmp_path / "bad.safetensors"
    save_file({"0.weight": torch.eye(4)}, str(bad))  # 0.weight is (4, 2): its Gram is (2, 2)
    code, out = _register(live_registry, _save(base, tmp_path / "ft.safetensors"),
                          "--base", str(registered_id(out)), "--name", "gram-ft-2",
                          "--gram", str(bad))  # fmt: skip
    assert code != 0
    assert "(in, in)" in out and "'0.weight'" in out
