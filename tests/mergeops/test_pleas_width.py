"""pleas at ``width_factor`` > 1 through the merge engine: ``merge_files`` and ``ckreg merge``
write the wider MLP, which the digits zoo's backbone loads; a model folder's ``config.json``
follows the written widths; bad widths and a method that breaks its declared shapes are errors
naming the cause, with nothing written (a tiny Llama: ``test_pleas_width_llama.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import mergeops
from bench.zoo.model import backbone_forward, check_backbone
from bench.zoo.multi_init import DigitsFeatureProbe
from mergeops.cli import merge_app
from mergeops.io.model_folder import ModelFolder, update_config_widths
from mergeops.methods.alignment.pleas import Pleas
from mergeops.methods.base import MergeError
from tests.mergeops.test_alignment import _model, _permuted

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def digits_probe() -> DigitsFeatureProbe:
    """The feature probe (also the objective the CLI test's YAML names)."""
    return DigitsFeatureProbe(
        torch.randn(256, 64, generator=torch.Generator().manual_seed(2)), ["t"]
    )


@pytest.fixture(scope="module")
def pair():
    a = _model(0)
    gen = torch.Generator().manual_seed(1)
    b = _permuted(a, torch.randperm(16, generator=gen), torch.randperm(8, generator=gen))
    return a, b, digits_probe()


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    source = mergeops.open_source(folder)
    return {k: tuple(source.metadata(k).shape) for k in source.keys()}  # noqa: SIM118


def test_merge_files_writes_the_wider_mlp_that_the_zoo_loads(pair, tmp_path):
    a, b, probe = pair
    out = tmp_path / "out"
    mergeops.merge_files("pleas", {"a": a, "b": b}, out_dir=out, objective=probe,
                         width_factor=1.5, progress=False, device="cpu")  # fmt: skip
    shapes = _shapes(out)
    assert shapes["fc1.weight"] == (24, 64) and shapes["norm1.bias"] == (24,)
    assert shapes["fc2.weight"] == (12, 24) and shapes["heads.t.weight"] == (3, 12)
    merged = {k: v.float() for k, v in mergeops.merge_with_extras(
        "pleas", {"a": a, "b": b}, objective=probe, width_factor=1.5, device="cpu").merged.items()}  # fmt: skip
    source = mergeops.open_source(out)
    assert all(torch.equal(source.get(k).float(), merged[k]) for k in shapes)  # file == memory
    check_backbone(merged)  # the zoo's loader takes the widths from the tensors
    x = probe.inputs
    want = backbone_forward(a, x) @ a["heads.t.weight"].T
    got = backbone_forward(merged, x) @ merged["heads.t.weight"].T
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_the_streamed_layout_declares_the_wider_shapes(pair):
    from mergeops.engine import output_layout
    from mergeops.plan import PlanRequest, build_plan

    a, b, probe = pair
    request = PlanRequest(method="pleas", models=[a, b], params={"width_factor": 1.5},
                          objective=probe, dtype="bfloat16", device="cpu")  # fmt: skip
    layout = {spec.name: spec for spec in output_layout(build_plan(request)) or []}
    assert layout["fc1.weight"].shape == (24, 64) and layout["heads.t.weight"].shape == (3, 12)
    assert layout["heads.t.bias"].shape == (3,)  # a tensor no layer moves keeps its shape
    assert {spec.dtype for spec in layout.values()} == {torch.bfloat16}


def test_ckreg_merge_config_writes_the_wider_mlp(pair, tmp_path):
    a, b, _ = pair
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    config = {"merge_method": "pleas", "conventions": "ckreg",
              "models": [{"model": "a.safetensors"}, {"model": "b.safetensors"}],
              "parameters": {"width_factor": 1.25},
              "objective": "tests.mergeops.test_pleas_width:digits_probe"}  # fmt: skip
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    args = ["merge", "--config", str(tmp_path / "merge.yml"), "--out", str(tmp_path / "out"),
            "--device", "cpu", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(merge_app, args)
    assert result.exit_code == 0, result.output
    shapes = _shapes(tmp_path / "out")
    assert shapes["fc1.weight"] == (20, 64) and shapes["fc2.weight"] == (10, 20)
    assert shapes["heads.t.weight"] == (3, 10)


@pytest.mark.parametrize(
    ("width", "count", "match"),
    [(2.5, 2, "width_factor"), (0.5, 2, "width_factor"), (1.5, 3, "width_factor 1.5: a wider")],
)
def test_bad_widths_are_refused_naming_width_factor(pair, tmp_path, width, count, match):
    a, b, probe = pair
    models = dict(list(zip("abc", [a, b, _model(3)], strict=True))[:count])
    with pytest.raises(MergeError, match=match):
        mergeops.merge_files("pleas", models, out_dir=tmp_path / "out", objective=probe,
                             width_factor=width, progress=False, device="cpu")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_tensor_off_its_declared_shape_names_the_tensor(pair, tmp_path, monkeypatch):
    a, b, probe = pair
    monkeypatch.setattr(Pleas, "output_shapes", lambda self, metas, ctx: {"fc1.weight": (25, 64)})
    with pytest.raises(
        MergeError, match=r"shape \(24, 64\) for 'fc1\.weight', expected \(25, 64\)"
    ):
        mergeops.merge_files("pleas", {"a": a, "b": b}, out_dir=tmp_path / "out",
                             objective=probe, width_factor=1.5, progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(Pleas, "output_shapes", lambda self, metas, ctx: {"fc9.weight": (2, 2)})
    with pytest.raises(MergeError, match=r"declares an output shape for 'fc9\.weight'"):
        mergeops.merge("pleas", {"a": a, "b": b}, objective=probe)


LLAMA = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2}


def test_config_widths_follow_the_written_tensors(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text(json.dumps({**LLAMA, "text_config": None}))
    out = tmp_path / "out"
    out.mkdir()
    up = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(30, 16) for i in range(2)}
    save_file(up, str(out / "model.safetensors"))
    ModelFolder(reference_dir=ref).write(out)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 30
    (out / "config.json").write_text(json.dumps(LLAMA))  # as the registry flow copies it
    assert update_config_widths(out) == {"intermediate_size": 30}
    assert update_config_widths(out) == {}  # already right: left alone
    save_file({**up, "model.layers.1.mlp.up_proj.weight": torch.zeros(20, 16)},
              str(out / "model.safetensors"))  # fmt: skip
    assert update_config_widths(out) == {}  # per-layer sizes: one field cannot say them
