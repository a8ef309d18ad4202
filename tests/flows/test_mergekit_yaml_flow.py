"""A mergekit YAML through ``POST /merges`` by checkpoint names: the flow runs it, the output equals
``ckreg merge --config`` on the same files, loads with ``from_pretrained``, has the tokenizer, the
generation config and a model card naming the inputs, and descends from every input and the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from flows.inputs import checkpoint_dir
from flows.pipelines import merge_checkpoints
from flows.preparation import prepare
from flows.runtime import current_runtime
from flows.tracking_records import merge_record
from mergeops.config import run_config
from registry.api.app import create_app
from registry.models import CheckpointCreate, CheckpointKind, Lineage
from registry.services import merge_runs as run_service
from registry.services.completion import register_directory
from registry.services.tokens import create_token
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv
from tests.registry.hf_tiny import save_tiny_model
from tests.registry.registry_fixtures import RecordingLauncher

CONFIG = """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: [1, 0.5]}}
  - model: {b}
    parameters: {{weight: [0.2, 0.5], density: 0.8}}
parameters: {{normalize: true}}
dtype: float32
"""


def _zoo(env: FlowEnv) -> dict[str, Path]:
    """A tiny Llama base and two fine-tunes, each a full HF folder (config, tokenizer)."""
    base = save_tiny_model(env.tmp / "hf" / "base", seed=7)
    weights = load_file(str(base / "model.safetensors"))
    folders = {"base": base}
    for seed, name in ((1, "ft-a"), (2, "ft-b")):
        folder = env.tmp / "hf" / name
        shutil.copytree(base, folder)
        torch.manual_seed(seed)
        tuned = {k: v + 0.02 * torch.randn_like(v) for k, v in weights.items()}
        save_file(tuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[name] = folder
    return folders


def _register(env: FlowEnv, folders: dict[str, Path]) -> dict[str, int]:
    ids: dict[str, int] = {}
    with env.session() as session:
        for name, folder in folders.items():
            kind = CheckpointKind.base if name == "base" else CheckpointKind.finetune
            data = CheckpointCreate(name=name, kind=kind, base_id=ids.get("base"))
            ids[name] = register_directory(
                session=session,
                store=current_runtime().store,
                settings=env.settings,
                data=data,
                directory=folder,
            ).id
    return ids


def _post(env: FlowEnv, text: str) -> dict:  # type: ignore[type-arg]
    launcher = RecordingLauncher()
    with env.session() as session:
        _, token = create_token(session=session, name="w", scopes=["write"])
    with TestClient(create_app(env.settings, launcher=launcher)) as client:
        response = client.post(
            "/api/v1/merges",
            json={"mergekit": text},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 202, response.text
    assert launcher.merges == [response.json()["id"]]
    return response.json()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(str(shard)))
    return found


def test_mergekit_yaml_by_names_runs_and_equals_ckreg_merge(flow_env: FlowEnv) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = _zoo(flow_env)
    ids = _register(flow_env, folders)
    run = _post(flow_env, CONFIG.format(base="ckreg/base", a="ckreg/ft-a", b="ckreg/ft-b"))
    output_id = merge_checkpoints(run["id"])
    assert output_id is not None
    with flow_env.session() as session:
        merged = checkpoint_dir(
            session=session,
            store=current_runtime().store,
            checkpoint_id=output_id,
            cache_dir=flow_env.tmp / "read",
        )
        edges = {
            (e.parent_id, e.role) for e in session.query(Lineage).filter_by(child_id=output_id)
        }
    assert edges == {(ids["ft-a"], "input"), (ids["ft-b"], "input"), (ids["base"], "base")}

    local = flow_env.tmp / "local"
    path = flow_env.tmp / "merge.yml"
    path.write_text(CONFIG.format(**{k.replace("ft-", ""): str(v) for k, v in folders.items()}))
    run_config(path, local, progress=False)
    ours, theirs = _tensors(merged), _tensors(local)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name

    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    card = (merged / "README.md").read_text()
    for name in ("base", "ft-a", "ft-b"):
        assert f"- ckreg/{ids[name]}" in card
    assert "base_model_relation: merge" in card
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "float32"
    with flow_env.session() as session:  # MLflow logs the run's own YAML
        row = run_service.get_merge_run(session=session, run_id=run["id"])
        prepared = prepare(
            session=session, store=current_runtime().store, work_root=flow_env.tmp / "rec",
            run_id=run["id"], inputs="cache",
        )  # fmt: skip
        record = merge_record(
            session=session, run=row, output_id=output_id, metrics={}, prepared=prepared
        )
    assert f"model: ckreg/{ids['ft-a']}" in record.config_yaml
    assert "density:" in record.config_yaml
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(merged)("the cat sat")["input_ids"] == [3, 4, 5]


def test_a_policy_template_merges_its_selectors_matches(flow_env: FlowEnv) -> None:
    from registry.services.policies import plan_policy_run

    folders = _zoo(flow_env)
    ids = _register(flow_env, folders)
    template = "merge_method: task_arithmetic\nparameters: {weight: 0.5}\ndtype: float32\n"
    selector = {"base_id": ids["base"], "window": "all_since_last_fold"}
    policy_id = flow_env.policy(name="kit", mergekit=template, selector=selector)
    with flow_env.session() as session:
        planned = plan_policy_run(session=session, policy_id=policy_id)
    assert planned is not None
    output_id = merge_checkpoints(planned[0].id)
    assert output_id is not None
    with flow_env.session() as session:
        merged = checkpoint_dir(
            session=session,
            store=current_runtime().store,
            checkpoint_id=output_id,
            cache_dir=flow_env.tmp / "read",
        )
    local = flow_env.tmp / "local"
    path = flow_env.tmp / "merge.yml"
    models = "".join(f"  - model: {folders[n]}\n" for n in ("ft-a", "ft-b"))
    path.write_text(f"{template}base_model: {folders['base']}\nmodels:\n{models}")
    run_config(path, local, progress=False)
    ours, theirs = _tensors(merged), _tensors(local)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert f"- ckreg/{ids['ft-b']}" in (merged / "README.md").read_text()
