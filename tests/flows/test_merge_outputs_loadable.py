"""A merge run's output carries its base's tokenizer and configs (from the registry's stored
files) and loads with ``from_pretrained``; the config states the dtype actually merged."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from flows.inputs import checkpoint_dir
from flows.pipelines import merge_checkpoints
from flows.runtime import current_runtime
from registry.models import CheckpointCreate, CheckpointKind
from registry.services import merge_runs as run_service
from registry.services.common import checkpoint_files
from registry.services.completion import register_directory
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv
from tests.registry.hf_tiny import save_tiny_model


def _register(env: FlowEnv, folder, **fields) -> int:  # type: ignore[no-untyped-def]
    runtime = current_runtime()
    with env.session() as session:
        data = CheckpointCreate(name=folder.name, **fields)
        return register_directory(
            session=session, store=runtime.store, settings=env.settings, data=data, directory=folder
        ).id


def test_merged_output_has_the_base_tokenizer_and_loads(flow_env: FlowEnv) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = save_tiny_model(flow_env.tmp / "hf-base", seed=7)
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "dtype": "float16"}))
    (base_dir / "README.md").write_text("# the base's own card\n")
    (base_dir / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    base = _register(flow_env, base_dir, kind=CheckpointKind.base)
    weights = load_file(str(base_dir / "model.safetensors"))
    inputs = []
    for seed in (1, 2):
        folder = flow_env.tmp / f"hf-ft-{seed}"
        folder.mkdir()
        torch.manual_seed(seed)
        save_file(
            {k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()},
            str(folder / "model.safetensors"),
        )
        inputs.append(
            _register(flow_env, folder, kind=CheckpointKind.finetune, base_id=base, task=f"t{seed}")
        )
    request = run_service.MergeRequest(
        method="task_arithmetic",
        base_id=base,
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in inputs],
    )
    with flow_env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    output_id = merge_checkpoints(run.id)
    assert output_id is not None
    runtime = current_runtime()
    with flow_env.session() as session:
        names = {f.name for f in checkpoint_files(session, output_id)}
        folder = checkpoint_dir(
            session=session,
            store=runtime.store,
            checkpoint_id=output_id,
            cache_dir=flow_env.tmp / "c",
        )
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not names & {"README.md", "trainer_state.json"}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert AutoTokenizer.from_pretrained(folder)("the cat sat")["input_ids"] == [3, 4, 5]
