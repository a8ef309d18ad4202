"""The MoE flows under Prefect's harness: build an MoE from registered fine-tunes (lineage to every
expert and the base), compress it (a child with its metrics), and bad ids leave nothing ready."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from sqlmodel import select
from typer.testing import CliRunner

from flows.cli import app
from flows.inputs import checkpoint_dir
from flows.moe_flow import moe_build, moe_compress
from flows.runtime import current_runtime
from registry.models import Checkpoint, CheckpointCreate, CheckpointKind, CheckpointStatus, Lineage
from registry.services.completion import register_directory
from registry.services.metrics import list_metrics
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv
from tests.mergeops import moe_tiny


def _register(env: FlowEnv, name: str, model: object, kind: CheckpointKind) -> int:
    folder = moe_tiny.save(model, env.tmp / "src" / name)
    with env.session() as session:
        checkpoint = register_directory(
            session=session,
            store=current_runtime().store,
            settings=env.settings,
            data=CheckpointCreate(name=name, kind=kind),
            directory=folder,
        )
        return checkpoint.id or 0


def _parents(env: FlowEnv, child: int) -> dict[int, str]:
    with env.session() as session:
        edges = session.exec(select(Lineage).where(Lineage.child_id == child)).all()
        return {e.parent_id: str(e.role) for e in edges}


def test_build_then_compress_registers_lineage_and_metrics(flow_env: FlowEnv) -> None:
    from transformers import AutoModelForCausalLM

    base = moe_tiny.llama(0)
    base_id = _register(flow_env, "base", base, CheckpointKind.base)
    experts = [
        _register(flow_env, f"ft{s}", moe_tiny.nudged(base, s, 0.05), CheckpointKind.finetune)
        for s in (1, 2, 3, 4)
    ]
    spec = {
        "base_checkpoint_id": base_id,
        "shared_expert": "base",
        "experts": [
            {"checkpoint_id": e, "positive_token_ids": [[i + 1, i + 2, i + 3]]}
            for i, e in enumerate(experts)
        ],
    }
    moe_id = moe_build(spec, name="moe-of-4")
    assert _parents(flow_env, moe_id) == {
        **dict.fromkeys(experts, "input"),
        base_id: "base",
    }
    with flow_env.session() as session:
        moe = session.get(Checkpoint, moe_id)
        assert moe is not None and moe.status == CheckpointStatus.ready
        assert moe.meta["moe"]["experts_per_layer"] == 4
        assert moe.meta["moe"]["layers_with_shared_experts"] == 2

    calibration = [t.flatten().tolist() for t in moe_tiny.calibration(4, seed=3)]
    small_id = moe_compress(moe_id, 2, calibration, method="sub_moe")
    assert _parents(flow_env, small_id) == {moe_id: "input"}
    with flow_env.session() as session:
        small = session.get(Checkpoint, small_id)
        assert small is not None and small.status == CheckpointStatus.ready
        assert small.meta["moe"]["experts_per_layer"] == 2
        values = {m.name: m.value for m in list_metrics(session=session, checkpoint_id=small_id)}
        folder = checkpoint_dir(
            session=session,
            store=current_runtime().store,
            checkpoint_id=small_id,
            cache_dir=flow_env.tmp / "cache",
        )
    assert values["moe/experts_before"] == 4 and values["moe/experts_after"] == 2
    assert 0.2 < values["moe/bytes_saved_fraction"] < 0.6
    assert values["moe/calibration_nll_after"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.num_experts == 2
    assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()

    # through the server-side CLI: ckreg moe compress-flow
    (flow_env.tmp / "calib.json").write_text(json.dumps(calibration))
    args = ["moe", "compress-flow", str(moe_id), "-m", "2", "--method", "sub_moe"]
    args += ["--calibration", str(flow_env.tmp / "calib.json"), "--name", "moe-fac"]
    done = CliRunner().invoke(app, [*args, "--rank", "4", "--factored"])
    assert done.exit_code == 0, done.output
    factored_id = int(done.output.split("registered ")[1].split(",")[0])
    options = {"leaders": "frequency", "factored": True, "rank": 4}
    with flow_env.session() as session:
        factored = session.get(Checkpoint, factored_id)
        assert factored is not None and factored.status == CheckpointStatus.ready
        assert factored.meta["moe"]["experts_per_layer"] == 2
        assert factored.meta["params"] == {"num_experts": 2, **options}
        saved = {m.name: m.value for m in list_metrics(session=session, checkpoint_id=factored_id)}
    assert saved["moe/bytes_saved"] > values["moe/bytes_saved"]


def test_unknown_expert_fails_and_registers_nothing(flow_env: FlowEnv) -> None:
    base_id = _register(flow_env, "base", moe_tiny.llama(0), CheckpointKind.base)
    spec = {
        "base_checkpoint_id": base_id,
        "experts": [{"checkpoint_id": base_id}, {"checkpoint_id": 999}],
    }
    with pytest.raises(Exception, match="999"):
        moe_build(spec, name="never")
    (flow_env.tmp / "spec.yml").write_text(yaml.safe_dump(spec))
    args = ["moe", "build-flow", "-c", str(flow_env.tmp / "spec.yml"), "--name", "never"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 1 and "checkpoint 999" in done.output
    with pytest.raises(ValueError, match="unknown key"):
        moe_build({**spec, "gates": "x"}, name="never")
    with flow_env.session() as session:
        names = [c.name for c in session.exec(select(Checkpoint)).all()]
    assert names == ["base"]
