"""``family_compress``: TALL-mask family compression end to end on real checkpoints, a real
Prefect harness and real evaluators (a distance-to-target evaluator and the digits evaluator on a
tiny zoo): the retention rule both ways, keeping both forms, downloads of a rebuilt member over
the REST API, and bad input that fails the run and leaves the originals untouched."""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load
from sqlmodel import select

from flows import runtime as flow_runtime
from flows.family_flow import family_compress
from registry.errors import InvalidInput, InvalidState, NotFound
from registry.models import Artifact, ArtifactRole, Checkpoint, CheckpointKind, Metric
from registry.services import family as family_service
from registry.services.deletion import delete_checkpoint_report
from registry.services.gc import collect_garbage
from registry.services.tensors import checkpoint_tensor_source
from registry.storage.tall_codec import RECONSTRUCTED_KEY
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded, FlowEnv, tiny_state

TARGETS: dict[str, dict[str, torch.Tensor]] = {}
BASE: dict[str, torch.Tensor] = {}
ZOO: dict[str, Path] = {}


class TargetEvaluator:
    """``accuracy/<task>`` = exp(-‖θ - θ_task‖ / (0.05·‖θ_task - θ0‖)): 1 for the fine-tune
    itself, falling fast as a model moves away from it (entry point ``ckreg-test-family``)."""

    name = "ckreg-test-family"

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        flat = torch.cat([state_dict[k].float().reshape(-1) for k in sorted(BASE)])
        base = torch.cat([BASE[k].float().reshape(-1) for k in sorted(BASE)])
        out = {}
        for task, target in TARGETS.items():
            goal = torch.cat([target[k].float().reshape(-1) for k in sorted(BASE)])
            scale = 0.05 * float((goal - base).norm())
            out[f"accuracy/{task}"] = math.exp(-float((flat - goal).norm()) / scale)
        return out

    def objective(self) -> Any:
        raise NotImplementedError

    def fisher(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class BrokenEvaluator(TargetEvaluator):
    """Fails on every call (entry point ``ckreg-test-family-broken``)."""

    name = "ckreg-test-family-broken"

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        raise RuntimeError("evaluation data unavailable")


class LateFailingEvaluator(TargetEvaluator):
    """Scores the first member (its original and the 5 λ), then fails on the second
    (entry point ``ckreg-test-family-late``)."""

    name = "ckreg-test-family-late"
    calls = 0

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        LateFailingEvaluator.calls += 1
        if LateFailingEvaluator.calls > 6:
            raise RuntimeError("evaluation worker lost")
        return super().evaluate(state_dict)


def tiny_zoo_evaluator() -> Any:
    """The digits evaluator on the module's tiny zoo (entry point ``ckreg-test-family-digits``)."""
    from bench.zoo.evaluator import DigitsEvaluator

    return DigitsEvaluator(ZOO["dir"])


@pytest.fixture(scope="module", autouse=True)
def family_plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = tmp_path_factory.mktemp("family-plugins")
    dist = root / "ckreg_test_family-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ckreg-test-family\nVersion: 0\n")
    module = "tests.flows.test_family_compression"
    (dist / "entry_points.txt").write_text(
        "[ckreg.evaluators]\n"
        f"ckreg-test-family = {module}:TargetEvaluator\n"
        f"ckreg-test-family-broken = {module}:BrokenEvaluator\n"
        f"ckreg-test-family-late = {module}:LateFailingEvaluator\n"
        f"ckreg-test-family-digits = {module}:tiny_zoo_evaluator\n"
    )
    sys.path.insert(0, str(root))
    yield
    sys.path.remove(str(root))


def _family(env: FlowEnv, *, disjoint: bool, count: int = 3) -> tuple[int, list[int]]:
    """A base and ``count`` fine-tunes; ``disjoint`` task vectors touch separate entries (TALL
    recovers them exactly), else dense overlapping ones (it cannot)."""
    BASE.clear()
    BASE.update(tiny_state(0))
    TARGETS.clear()
    base_id = env.register("base", BASE, kind=CheckpointKind.base)
    ids = []
    gen = torch.Generator().manual_seed(7)
    for index in range(count):
        member = {}
        for key, value in BASE.items():
            delta = torch.randn(value.shape, generator=gen) * 0.5
            if disjoint:
                keep = torch.arange(value.numel()).reshape(value.shape) % count == index
                delta = delta * keep
            member[key] = value + delta
        task = f"t{index}"
        TARGETS[task] = member
        ids.append(env.register(f"ft-{task}", member, base_id=base_id, task=task))
    return base_id, ids


def _rows(env: FlowEnv, checkpoint_id: int) -> list[Artifact]:
    with env.session() as session:
        query = select(Artifact).where(Artifact.checkpoint_id == checkpoint_id)
        return list(session.exec(query).all())


def _weights(env: FlowEnv, checkpoint_id: int) -> Artifact:
    (row,) = [r for r in _rows(env, checkpoint_id) if r.role == ArtifactRole.weights]
    return row


def _row_state(row: Artifact) -> tuple[Any, ...]:
    return (row.codec, row.sha256, row.size, row.blob_key, row.stored_size, row.meta)


def _metrics(env: FlowEnv, checkpoint_id: int) -> dict[str, float]:
    with env.session() as session:
        rows = session.exec(select(Metric).where(Metric.checkpoint_id == checkpoint_id)).all()
        return {row.name: row.value for row in rows}


def test_every_member_kept_replaces_the_originals_and_downloads_rebuild(
    embedded: Embedded,
) -> None:
    env = embedded.env
    base_id, ids = _family(env, disjoint=True)
    before = {i: _weights(env, i) for i in ids}
    report = family_compress(base_id, ids, evaluator="ckreg-test-family")
    assert report["outcome"] == "replaced"
    assert report["family_bytes"] < report["original_bytes"]
    for member_id in ids:
        row = _weights(env, member_id)
        assert row.codec == "tall" and row.meta["reconstructed"] is True
        assert row.meta["original_sha256"] == before[member_id].sha256
        assert set(row.meta["codec_refs"]) == {"base", "merged", "mask"}
        assert _metrics(env, member_id)["tall/retention"] >= 0.99
        response = embedded.client.get(
            f"/api/v1/checkpoints/{member_id}/files/model.safetensors", headers=embedded.headers
        )
        assert response.status_code == 200
        assert response.headers["X-Content-SHA256"] == row.sha256 != before[member_id].sha256
        tensors = load(response.content)
        task = f"t{ids.index(member_id)}"
        for key, value in TARGETS[task].items():
            assert torch.allclose(tensors[key], value, atol=1e-5), key
        path = env.tmp / f"dl-{member_id}.safetensors"
        path.write_bytes(response.content)
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()[RECONSTRUCTED_KEY] == "tall"
        ranged = embedded.client.get(
            f"/api/v1/checkpoints/{member_id}/files/model.safetensors",
            headers={**embedded.headers, "Range": "bytes=100-300"},
        )
        assert ranged.status_code == 206 and ranged.content == response.content[100:301]
        public = embedded.client.get(f"/api/v1/checkpoints/{member_id}", headers=embedded.headers)
        assert public.json()["metadata"]["family_compression"]["reconstructed"] is True
        (listed,) = public.json()["files"]
        assert listed["codec"] == "tall"  # the public mark of a (lossy) rebuilt file
        assert listed["sha256"] == row.sha256
    # the base and the family's τ_MTL stay while members decode against them, even forced
    runtime = flow_runtime.current_runtime()
    with env.session() as session:
        report = delete_checkpoint_report(
            session=session, store=runtime.store, checkpoint_id=base_id, force=True
        )
    assert report.kept_as_codec_ref and all(
        n.endswith("model.safetensors") for n in report.kept_as_codec_ref
    )
    again = embedded.client.get(
        f"/api/v1/checkpoints/{ids[0]}/files/model.safetensors", headers=embedded.headers
    )
    assert again.status_code == 200
    assert hashlib.sha256(again.content).hexdigest() == _weights(env, ids[0]).sha256


def test_a_member_below_the_share_keeps_every_original(flow_env: FlowEnv) -> None:
    base_id, ids = _family(flow_env, disjoint=False)
    before = {i: _row_state(_weights(flow_env, i)) for i in ids}
    report = family_compress(base_id, ids, evaluator="ckreg-test-family", min_retention=0.99)
    assert report["outcome"] == "kept"
    assert min(m["retention"] for m in report["members"]) < 0.99
    for member_id in ids:
        assert _row_state(_weights(flow_env, member_id)) == before[member_id]
        assert [r.role for r in _rows(flow_env, member_id)] == [ArtifactRole.weights]
        retention = _metrics(flow_env, member_id)["tall/retention"]
        (figure,) = [m for m in report["members"] if m["checkpoint_id"] == member_id]
        assert retention == pytest.approx(figure["retention"])
    # a lower bar accepts the same family: the rule is the configured share, both ways
    lenient = family_compress(base_id, ids, evaluator="ckreg-test-family", min_retention=1e-9)
    assert lenient["outcome"] == "replaced"
    assert all(_weights(flow_env, i).codec == "tall" for i in ids)
    runtime = flow_runtime.current_runtime()
    with flow_env.session() as session:
        # gc keeps what the rebuilt members decode from and takes the released originals
        gc = collect_garbage(
            session=session, store=runtime.store, grace_s=0, upload_ttl_s=3600, dry_run=False,
            now=datetime.now(UTC) + timedelta(seconds=5),
        )  # fmt: skip
        assert set(gc.deleted) == {blob_key for _, _, _, blob_key, _, _ in before.values()}
        # the merge engine's row reads see the rebuilt member, through the codec
        source = checkpoint_tensor_source(
            session=session, store=runtime.store, checkpoint_id=ids[0]
        )
        whole = family_service.load_state(
            session=session, store=runtime.store, checkpoint_id=ids[0]
        )
    assert torch.equal(source.get_rows("layers.0.weight", 2, 5), whole["layers.0.weight"][2:5])
    assert not torch.equal(whole["layers.0.weight"], TARGETS["t0"]["layers.0.weight"])
    with pytest.raises(InvalidState, match="already stored in family"):
        family_compress(base_id, ids, evaluator="ckreg-test-family")


def test_keep_originals_stores_both(flow_env: FlowEnv) -> None:
    base_id, ids = _family(flow_env, disjoint=True, count=2)
    before = {i: _weights(flow_env, i).sha256 for i in ids}
    report = family_compress(base_id, ids, evaluator="ckreg-test-family", keep_originals=True)
    assert report["outcome"] == "stored_alongside"
    for figure in report["members"]:
        member_id, sibling_id = figure["checkpoint_id"], figure["served_by"]
        assert sibling_id != member_id
        assert _weights(flow_env, member_id).sha256 == before[member_id]
        assert _weights(flow_env, member_id).codec != "tall"
        sibling = _weights(flow_env, sibling_id)
        assert sibling.codec == "tall" and sibling.meta["original_sha256"] == before[member_id]
        with flow_env.session() as session:
            row = session.get(Checkpoint, sibling_id)
            assert row is not None and row.base_id == base_id and "tall-reconstructed" in row.tags


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A two-task digits zoo (a few seconds to build), served by ``ckreg-test-family-digits``."""
    from bench.zoo.build import build_zoo
    from bench.zoo.train import TrainConfig

    config = TrainConfig(hidden=32, features=16, pretrain_epochs=5, finetune_epochs=3,
                         trajectory_points=2, fisher_examples=64)  # fmt: skip
    zoo = tmp_path_factory.mktemp("family-zoo")
    manifest = build_zoo(zoo, tasks=("rot90", "parity"), irrelevant=0, config=config)
    ZOO["dir"] = zoo
    return manifest


def _register_zoo(env: FlowEnv, manifest: Any) -> tuple[int, list[int]]:
    from bench.zoo.manifest import load_tensors

    zoo = ZOO["dir"]
    base_id = env.register("zoo-base", load_tensors(zoo, manifest.base), kind="base")
    ids = [
        env.register(f"zoo-{t}", load_tensors(zoo, e.model), base_id=base_id, task=t)
        for t, e in manifest.tasks.items()
    ]
    return base_id, ids


def test_digits_zoo_family_end_to_end(flow_env: FlowEnv, tiny_zoo: Any) -> None:
    base_id, ids = _register_zoo(flow_env, tiny_zoo)
    report = family_compress(base_id, ids, evaluator="ckreg-test-family-digits", min_retention=0.5)
    assert {m["metric"] for m in report["members"]} == {"accuracy/rot90", "accuracy/parity"}
    for figure in report["members"]:
        assert figure["lam"] in (0.2, 0.3, 0.4, 0.5, 0.6)
        assert figure["reconstructed"] == pytest.approx(figure["retention"] * figure["original"])
    # the tiny zoo builds deterministically: rot90 keeps ~58 %, parity ~99 % (both >= 50 %)
    assert min(m["retention"] for m in report["members"]) >= 0.5
    assert report["outcome"] == "replaced"
    # the rebuilt members read through the codecs (base and members arrive zipnn-compressed)
    from bench.zoo.manifest import load_tensors

    zoo, runtime = ZOO["dir"], flow_runtime.current_runtime()
    base = load_tensors(zoo, tiny_zoo.base)
    members = [load_tensors(zoo, e.model) for e in tiny_zoo.tasks.values()]
    merged = family_service.multitask_vector(base, members)
    for member, figure in zip(members, report["members"], strict=True):
        masks = family_service.tall_masks(base, member, merged, figure["lam"])
        expected = family_service.rebuild_state(
            base, merged, masks, family_service.state_dtypes(member)
        )
        with flow_env.session() as session:
            served = family_service.load_state(
                session=session, store=runtime.store, checkpoint_id=figure["checkpoint_id"]
            )
        assert all(torch.equal(served[k], expected[k]) for k in expected)


def test_cli_reports_and_refuses_bad_input(
    flow_env: FlowEnv, tiny_zoo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from registry.settings import get_settings

    base_id, ids = _register_zoo(flow_env, tiny_zoo)
    before = {i: _row_state(_weights(flow_env, i)) for i in ids}
    monkeypatch.setenv("CKREG_HOME", str(flow_env.settings.home))
    monkeypatch.setenv("CKREG_MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        args = ["family", "compress", "--base", str(base_id), "--evaluator",
                "ckreg-test-family-digits", "-q"]  # fmt: skip
        one = runner.invoke(app, [*args, "--task-vectors", str(ids[0])])
        assert one.exit_code == 1 and "at least 2 fine-tunes" in one.output
        strict = runner.invoke(app, [*args, "--task-vectors", ",".join(map(str, ids)),
                                     "--min-retention", "1.0"])  # fmt: skip
        assert strict.exit_code == 0, strict.output
        assert "outcome: kept" in strict.output and "kept the originals" in strict.output
        assert {i: _row_state(_weights(flow_env, i)) for i in ids} == before
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("other_base", InvalidInput),
        ("one_member", InvalidInput),
        ("unknown_member", NotFound),
        ("broken_evaluator", RuntimeError),
        ("evaluator_fails_midway", RuntimeError),
        ("unknown_evaluator", LookupError),
        ("base_as_member", InvalidInput),
    ],
)
def test_bad_input_fails_the_run_and_leaves_originals(
    flow_env: FlowEnv, case: str, error: type[Exception]
) -> None:
    base_id, ids = _family(flow_env, disjoint=True, count=2)
    evaluator = "ckreg-test-family"
    if case == "other_base":
        other = flow_env.register("other-base", tiny_state(5), kind=CheckpointKind.base)
        ids.append(flow_env.register("stray", tiny_state(6), base_id=other, task="x"))
    elif case == "one_member":
        ids = ids[:1]
    elif case == "unknown_member":
        ids.append(987654)
    elif case == "broken_evaluator":
        evaluator = "ckreg-test-family-broken"
    elif case == "evaluator_fails_midway":
        evaluator = "ckreg-test-family-late"
    elif case == "unknown_evaluator":
        evaluator = "no-such-evaluator"
    elif case == "base_as_member":
        ids.append(base_id)
    before = {i: _row_state(_weights(flow_env, i)) for i in ids if i != 987654}
    with pytest.raises(error) as failure:
        family_compress(base_id, ids, evaluator=evaluator)
    assert str(failure.value)
    for member_id, row in before.items():
        assert _row_state(_weights(flow_env, member_id)) == row
        assert "tall/retention" not in _metrics(flow_env, member_id)
    assert not [r for r in _rows(flow_env, base_id) if r.role == ArtifactRole.task_vector]
