"""The digits zoo: deterministic build, layout and shapes, evaluator, objective, entry point."""

from __future__ import annotations

import hashlib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.zoo.build import build_zoo, ensure_zoo, main
from bench.zoo.evaluator import DigitsEvaluator, DigitsObjective
from bench.zoo.manifest import ZooManifest, load_manifest, load_tensors
from bench.zoo.model import backbone_shapes
from bench.zoo.train import TrainConfig

TASKS = ("rot90", "parity")
TINY = TrainConfig(
    hidden=32,
    features=16,
    pretrain_epochs=5,
    finetune_epochs=3,
    trajectory_points=3,
    fisher_examples=64,
)


def _build(out: Path, seed: int = 0) -> ZooManifest:
    return build_zoo(out, seed=seed, tasks=TASKS, irrelevant=1, config=TINY)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    _build(out)
    return out


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_builds_identical_bytes(zoo: Path, tmp_path: Path) -> None:
    _build(tmp_path / "again")
    assert _digests(tmp_path / "again") == _digests(zoo)


def test_other_seed_builds_other_models(zoo: Path, tmp_path: Path) -> None:
    _build(tmp_path / "seed1", seed=1)
    ours = load_file(str(zoo / "base/model.safetensors"))
    theirs = load_file(str(tmp_path / "seed1/base/model.safetensors"))
    assert not torch.equal(ours["fc1.weight"], theirs["fc1.weight"])


def test_layout_names_and_shapes(zoo: Path) -> None:
    manifest = load_manifest(zoo)
    shapes = backbone_shapes(TINY.hidden, TINY.features)
    assert manifest.backbone_keys == list(shapes)
    assert sum(manifest.splits.values()) == 1797
    assert list(manifest.tasks) == list(TASKS)
    base = load_tensors(zoo, manifest.base)
    assert {k: tuple(v.shape) for k, v in base.items()} == shapes
    for name, entry in manifest.tasks.items():
        assert entry.model == f"tasks/{name}/model.safetensors"
        for path in (entry.model, entry.second_moment, entry.fisher):
            tensors = load_tensors(zoo, path)
            assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes, path
        moments = load_tensors(zoo, entry.second_moment)
        assert all(bool((v >= 0).all()) and v.abs().sum() > 0 for v in moments.values())
        head = load_tensors(zoo, entry.head)
        assert tuple(head["weight"].shape) == (entry.n_classes, TINY.features)
        steps = [point.step for point in entry.trajectory]
        assert steps == sorted(steps) and steps[-1] == entry.steps and len(steps) == 3
        last = load_tensors(zoo, entry.trajectory[-1].model)
        assert set(last) == set(shapes) | {f"heads.{name}.weight", f"heads.{name}.bias"}
        assert torch.equal(last["fc1.weight"], load_tensors(zoo, entry.model)["fc1.weight"])
        assert all(point.loss > 0 for point in entry.trajectory)
    assert len(manifest.irrelevant) == 1
    assert (zoo / "irrelevant/0/model.safetensors").is_file()


def test_evaluator_scores_finetunes_above_chance(zoo: Path) -> None:
    manifest = load_manifest(zoo)
    evaluator = DigitsEvaluator(zoo, split="validation")
    chance = {"rot90": 0.1, "parity": 0.5}
    for task in TASKS:
        metrics = evaluator.evaluate(load_tensors(zoo, manifest.tasks[task].model))
        assert metrics[f"accuracy/{task}"] > chance[task] + 0.2, metrics
        assert metrics[f"normalized_accuracy/{task}"] == pytest.approx(1.0, abs=1e-6)
        assert "accuracy/avg" in metrics and "normalized_accuracy/avg" in metrics
    base = evaluator.evaluate(load_tensors(zoo, manifest.base))
    assert base["accuracy/rot90"] < manifest.tasks["rot90"].accuracy["finetune/validation"]


def test_evaluator_uses_a_carried_head(zoo: Path) -> None:
    manifest = load_manifest(zoo)
    evaluator = DigitsEvaluator(zoo, split="test", tasks=["rot90"])
    point = load_tensors(zoo, manifest.tasks["rot90"].trajectory[-1].model)
    garbage = point | {"heads.rot90.weight": torch.zeros_like(point["heads.rot90.weight"])}
    assert (
        evaluator.evaluate(point)["accuracy/rot90"] > evaluator.evaluate(garbage)["accuracy/rot90"]
    )


def test_objective_is_differentiable_and_uses_validation(zoo: Path) -> None:
    evaluator = DigitsEvaluator(zoo, proxy_size=16)
    objective = evaluator.objective()
    assert isinstance(objective, DigitsObjective)
    assert all(len(data.y) == 16 for data in objective.proxies.values())
    params = {
        k: v.requires_grad_(True) for k, v in load_tensors(zoo, load_manifest(zoo).base).items()
    }
    loss = objective.loss(params)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert params["fc1.weight"].grad is not None
    assert params["fc1.weight"].grad.abs().sum() > 0


def test_fisher_matches_backbone(zoo: Path) -> None:
    manifest = load_manifest(zoo)
    evaluator = DigitsEvaluator(zoo, fisher_examples=32)
    fisher = evaluator.fisher(load_tensors(zoo, manifest.tasks["parity"].model), task="parity")
    assert {k: tuple(v.shape) for k, v in fisher.items()} == backbone_shapes(
        TINY.hidden, TINY.features
    )
    assert all(bool((v >= 0).all()) for v in fisher.values())


def test_bad_inputs_name_the_problem(zoo: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        DigitsEvaluator(tmp_path)
    with pytest.raises(KeyError, match="nope"):
        DigitsEvaluator(zoo, tasks=["nope"])
    with pytest.raises(ValueError, match="split"):
        DigitsEvaluator(zoo, split="dev")
    with pytest.raises(KeyError, match="zoo_dir"):
        DigitsEvaluator.from_config({"split": "test"})
    evaluator = DigitsEvaluator.from_config({"zoo_dir": str(zoo), "split": "test"})
    assert evaluator.split == "test"
    partial = load_tensors(zoo, load_manifest(zoo).base)
    del partial["fc2.weight"]
    with pytest.raises(KeyError, match=r"fc2\.weight"):
        evaluator.evaluate(partial)
    with pytest.raises(KeyError, match="unknown zoo task"):
        build_zoo(tmp_path / "bad", tasks=["rot91"], config=TINY)


def test_ensure_zoo_builds_once(zoo: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "digits"
    assert ensure_zoo(target, tasks=TASKS, irrelevant=1, config=TINY) == target
    assert _digests(target) == _digests(zoo)
    stamp = (target / "manifest.json").stat().st_mtime_ns
    ensure_zoo(target, tasks=TASKS, irrelevant=1, config=TINY)
    assert (target / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == ["digits"]  # no staging left behind


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_entry_point_resolves() -> None:
    found = [ep for ep in entry_points(group="ckreg.evaluators") if ep.name == "digits"]
    if not found:
        pytest.fail(
            "entry point 'digits' in group 'ckreg.evaluators' is not installed; "
            "install the project first: .venv/bin/pip install -e ."
        )
    assert found[0].load() is DigitsEvaluator
