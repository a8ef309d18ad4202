"""Merge runs from a mergekit YAML: the stored config run through ``ckreg merge``'s code.

The run's ``mergekit_config`` names every model ``ckreg/<id>``
(``registry.services.mergekit_runs``). Each referenced checkpoint becomes a local folder of its
files (``flows.inputs.checkpoint_dir``: links into the store or the download cache), linked as
``<work>/models/ckreg/<id>``, so the config runs unchanged with that folder as its root and the
model card names the inputs as the YAML does. The output is a model folder (shards,
config.json, generation config, tokenizer, README card, ``ckreg_merge.yml``), which
``flows.outputs`` registers with lineage to every input and the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from flows.inputs import checkpoint_dir
from flows.model_names import unique_model_names
from flows.outputs import OutputSpec, output_name
from registry.models import MergePolicy, MergeRun
from registry.services import merge_runs as run_service
from registry.services.common import load_checkpoint
from registry.services.mergekit_runs import PREFIX
from registry.storage import ObjectStore

if TYPE_CHECKING:
    from flows.preparation import PreparedMerge
    from mergeops.engine import MergeResult

MODELS = "models"


def prepare_mergekit(
    *,
    session: Session,
    store: ObjectStore,
    run: MergeRun,
    work_dir: Path,
    cache: Path,
    policy: MergePolicy | None,
) -> PreparedMerge:
    """Link every checkpoint the config references under ``work_dir/models``."""
    from flows.preparation import PreparedMerge

    assert run.mergekit_config is not None
    run_id = run.id or 0
    inputs = run_service.merge_run_inputs(session=session, run_id=run_id)
    checkpoints = [load_checkpoint(session, i.checkpoint_id) for i in inputs]
    ids = [c.id or 0 for c in checkpoints]
    folders = {i: _link(session, store, i, work_dir, cache) for i in ids}
    if run.base_id is not None:
        folders[run.base_id] = _link(session, store, run.base_id, work_dir, cache)
    return PreparedMerge(
        run_id=run_id,
        method=run.method,
        params={},
        work_dir=work_dir,
        models=[folders[i] for i in ids],
        model_names=unique_model_names(checkpoints),
        model_params=[{} for _ in ids],
        output=OutputSpec(
            name=output_name(run, policy.name if policy else None),
            input_ids=ids,
            tasks=[c.task for c in checkpoints if c.task],
        ),
        base=folders[run.base_id] if run.base_id is not None else None,
        evaluator=policy.evaluator if policy else run.evaluator,
        policy_name=policy.name if policy else None,
        mergekit=dict(run.mergekit_config),
    )


def _link(
    session: Session, store: ObjectStore, checkpoint_id: int, work: Path, cache: Path
) -> Path:
    """``work/models/ckreg/<id>`` -> the checkpoint's folder of files."""
    folder = checkpoint_dir(
        session=session, store=store, checkpoint_id=checkpoint_id, cache_dir=cache
    )
    link = work / MODELS / PREFIX / str(checkpoint_id)
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder.resolve(), target_is_directory=True)
    return link


def run_mergekit(prepared: PreparedMerge, *, device: str) -> MergeResult:
    """Run the stored config into the run's output folder (a loadable model folder)."""
    from mergeops.config import parse_config
    from mergeops.mergekit.run import run_merge_config

    assert prepared.mergekit is not None
    raw: dict[str, Any] = dict(prepared.mergekit)
    if device != "auto" and "device" not in raw:
        raw["device"] = device
    return run_merge_config(
        parse_config(raw), raw, prepared.work_dir / MODELS, prepared.out_dir, progress=False
    )
