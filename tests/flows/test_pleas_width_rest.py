"""pleas at ``width_factor`` > 1 over REST: ``POST /merges`` on stored features registers a
wider merged checkpoint with both inputs as parents; a width out of range and a wider merge
of three models are 422s naming ``width_factor``; a registered merge's copied
``config.json`` gets the widths of the written tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from flows.outputs import OutputSpec, add_extras
from registry.client.capture_features import FeatureLayer, capture_features
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded
from tests.flows.test_stored_features import (
    Mlp,
    _features,
    _merged,
    _models,
    _post,
    _run,
    _state,
)


def test_wider_pleas_registers_the_wider_model_with_both_parents(
    embedded: Embedded, tmp_path: Path
) -> None:
    a, b = _models()
    other = Mlp()  # a third model, another initialisation
    ids = [embedded.upload(name, _state(m))["id"] for name, m in (("a", a), ("b", b), ("c", other))]
    for checkpoint_id, model in zip(ids, (a, b, other), strict=True):
        assert _features(embedded, checkpoint_id, model, tmp_path).status_code == 201
    refused = embedded.post_merge("pleas", ids[:2], params={"width_factor": 2.5,
                                                           "least_squares": False})  # fmt: skip
    assert refused.status_code == 422 and "width_factor" in refused.text, refused.text

    run = _run(embedded, "pleas", ids[:2], least_squares=False, width_factor=1.5)
    assert run["status"] == "succeeded", run.get("error")
    merged = _merged(embedded, run, tmp_path)
    assert merged["fc1.weight"].shape == (12, 4) and merged["fc1.bias"].shape == (12,)
    assert merged["fc2.weight"].shape == (3, 12) and merged["fc2.bias"].shape == (3,)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # a and its permuted copy: the wider merge keeps a's function
        wide = torch.relu(x @ merged["fc1.weight"].T + merged["fc1.bias"])
        assert torch.allclose(wide @ merged["fc2.weight"].T + merged["fc2.bias"], a(x), atol=1e-4)
    output_id = run["output_checkpoint_id"]
    lineage = embedded.client.get(f"/api/v1/checkpoints/{output_id}/lineage").json()
    direct = {(e["parent_id"], e["role"]) for e in lineage["ancestors"] if e["depth"] == 1}
    assert direct == {(ids[0], "input"), (ids[1], "input")}

    three = embedded.post_merge("pleas", ids, params={"width_factor": 1.5,
                                                      "least_squares": False})  # fmt: skip
    assert three.status_code == 422, three.text
    assert "width_factor 1.5: a wider merge takes exactly 2 models, got 3" in three.text
    assert embedded.client.get("/api/v1/merges").json()["total"] == 1  # the one above only


def test_a_layer_stored_with_widen_false_keeps_its_width(
    embedded: Embedded, tmp_path: Path
) -> None:
    a, b = _models()
    kept = [FeatureLayer("hidden", module="act", weight="fc1.weight", bias="fc1.bias",
                         cols=("fc2.weight",), widen=False)]  # fmt: skip
    assert "widen" not in FeatureLayer("h", module="act", weight="w").spec()  # True: implied
    ids = []
    for name, model in (("a", a), ("b", b)):
        checkpoint_id = embedded.upload(name, _state(model))["id"]
        torch.manual_seed(1)
        batches = [torch.randn(16, 4) for _ in range(4)]
        path = capture_features(model, batches, kept, tmp_path / f"{name}.safetensors")
        assert _post(embedded, checkpoint_id, path).status_code == 201
        ids.append(checkpoint_id)
    run = _run(embedded, "pleas", ids, least_squares=False, width_factor=1.5)
    assert run["status"] == "succeeded", run.get("error")
    merged = _merged(embedded, run, tmp_path)
    assert merged["fc1.weight"].shape == (8, 4) and merged["fc2.weight"].shape == (3, 8)
    assert torch.allclose(merged["fc1.weight"], a.fc1.weight, atol=1e-5)  # aligned back


def test_a_copied_config_gets_the_written_widths(tmp_path: Path) -> None:
    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
              "torch_dtype": "float32"}  # fmt: skip
    (tmp_path / "input-config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(36, 16, dtype=torch.bfloat16)},
              str(out / "model.safetensors"))  # fmt: skip
    spec = OutputSpec(name="pleas-run1", input_ids=[1, 2], tasks=[],
                      extras=(("config.json", tmp_path / "input-config.json"),))  # fmt: skip
    add_extras(out, spec)
    written = json.loads((out / "config.json").read_text())
    assert written["intermediate_size"] == 36 and written["torch_dtype"] == "bfloat16"
