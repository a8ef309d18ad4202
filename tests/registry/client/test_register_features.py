"""``ckreg register --features``: per-layer features captured on the client land as a
``features`` artifact (checked against the checkpoint's weights) through the real CLI and
server; a file whose layers do not fit is refused naming the tensor."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from registry.client import Client
from registry.client.capture_features import FeatureLayer, capture_features
from tests.registry.client.test_cli import invoke, registered_id
from tests.registry.conftest import LiveRegistry


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(path))
    return path


def test_register_with_features(live_registry: LiveRegistry, tmp_path: Path) -> None:
    model = _model()
    layer = FeatureLayer("hidden", module="1", weight="0.weight", bias="0.bias", cols=("2.weight",))
    features = capture_features(model, [torch.randn(7, 3)], [layer], tmp_path / "f.safetensors")
    code, out = invoke(live_registry, "register", str(_save(model, tmp_path / "m.safetensors")),
                       "--no-base", "--name", "feat", "--features", str(features))  # fmt: skip
    assert code == 0, out
    with Client(live_registry.url, token=live_registry.token) as client:
        artifacts = client.artifacts(registered_id(out))
    found = [a for a in artifacts if a["role"] == "features"]
    assert len(found) == 1 and found[0]["tensors"] == 1
    assert '"cols": ["2.weight"]' in found[0]["metadata"]["ckreg.features"]


def test_features_of_the_wrong_width_are_refused(live_registry: LiveRegistry, tmp_path: Path):
    model = _model()
    layer = FeatureLayer("hidden", module="2", weight="0.weight")  # 2 wide; 0.weight has 5 rows
    features = capture_features(model, [torch.randn(7, 3)], [layer], tmp_path / "f.safetensors")
    code, out = invoke(live_registry, "register", str(_save(model, tmp_path / "m.safetensors")),
                       "--no-base", "--name", "feat-bad", "--features", str(features))  # fmt: skip
    assert code == 1
    assert "tensor 'hidden': features shape (7, 2), expected (samples, 5)" in out
