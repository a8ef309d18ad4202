"""What passes from a merge's sources into its output folder so that it loads with
``from_pretrained``: the base's (or first input's) config, generation config, tokenizer and
chat template, read from the registry's stored files; and the output's dtype in its config.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sqlmodel import Session

from flows.inputs import blob_path
from registry.models import Artifact, ArtifactRole, Checkpoint, CheckpointKind
from registry.safetensors_check import inspect_safetensors_file
from registry.services.blobs import stored_blob
from registry.services.common import checkpoint_files
from registry.storage import ObjectStore

ADAPTER_CONFIG = "adapter_config.json"
NEVER_PASSED = ("model.safetensors.index.json", "README.md")
# Training state a checkpoint may hold (``register --include-training-state``): not the merge's.
TRAINING_STATE = re.compile(r"^(optimizer|scheduler|scaler|rng_state|training_args|trainer_state)")
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def pass_through(
    session: Session,
    store: ObjectStore,
    checkpoints: list[Checkpoint],
    base_id: int | None,
    cache: Path,
    lora: str,
) -> dict[str, Any]:
    """OutputSpec fields that make the merged folder a loadable Hugging Face directory: every
    non-weight file (config, generation config, tokenizer, chat template, ...) of the base, else
    of the first input holding any; for adapters merged as adapters, those of the first adapter.
    A weights index never passes (the output has its own), nor an adapter's files into a full
    model, nor a model card (the card describes the source, not the merge)."""
    adapters = all(c.kind == CheckpointKind.adapter for c in checkpoints)
    adapter_out = adapters and lora == "factors"
    if adapter_out:
        sources: list[int | None] = [c.id for c in checkpoints[:1]]
    else:
        sources = [base_id, *(c.id for c in checkpoints)]
    for checkpoint_id in sources:
        if checkpoint_id is None:
            continue
        found = [f for f in checkpoint_files(session, checkpoint_id) if _passes(f, adapter_out)]
        if found:
            paths = tuple(
                blob_path(store=store, artifact=f, cache_dir=cache, blob=stored_blob(session, f))
                for f in found
            )
            return {"extras": tuple(zip((f.name for f in found), paths, strict=True)),
                    "adapter": adapter_out}  # fmt: skip
    return {}


def _passes(file: Artifact, adapter_out: bool) -> bool:
    """A stored file that belongs in the merged folder (see ``pass_through``)."""
    if file.role != ArtifactRole.config or file.name in NEVER_PASSED:
        return False
    if TRAINING_STATE.match(file.name):
        return False
    return adapter_out or file.name != ADAPTER_CONFIG


def set_config_dtype(out_dir: Path) -> None:
    """Write the dtype of the output's first floating-point tensor into its ``config.json``
    (``dtype``, and ``torch_dtype`` where the config has it), so ``from_pretrained`` with
    ``dtype="auto"`` loads what was merged."""
    dtype = None
    for shard in sorted(out_dir.glob("*.safetensors")):
        codes = [t.dtype for t in inspect_safetensors_file(shard).tensors.values()]
        dtype = next((FLOAT_DTYPES[c] for c in codes if c in FLOAT_DTYPES), None)
        if dtype is not None:
            break
    path = out_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return  # not ours to repair: passed through as stored
    if dtype is None or not isinstance(config, dict):
        return
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]
    path.write_text(json.dumps(config | dict.fromkeys(keys, dtype), indent=2) + "\n")
