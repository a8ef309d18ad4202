"""Policies with a mergekit YAML template instead of ``method`` + ``params``.

The template is a mergekit YAML (``registry.services.mergekit_runs`` for references). Without
``models`` or ``slices`` its ``models`` are the selector's matches in arrival order (each
``model: ckreg/<id>``, the template's ``parameters`` for all) and, without ``base_model``, the
selector's ``base_id`` is the base. With explicit ``models``/``slices`` the template is run as
written, names resolved again at each run (the newest ready checkpoint by then). Checked at
creation: a bad YAML, key, parameter or reference is refused naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import Session

from registry.errors import InvalidInput
from registry.models import Checkpoint, MergePolicy, MergePolicyCreate
from registry.services import merge_runs
from registry.services.mergekit_runs import PREFIX, check_config, load_yaml, resolve_config

_PLACEHOLDERS = [{"model": f"{PREFIX}selected-1"}, {"model": f"{PREFIX}selected-2"}]


def _fills_models(config: dict[str, Any]) -> bool:
    return not config.get("models") and not config.get("slices")


def check_template(*, session: Session, data: MergePolicyCreate) -> MergePolicyCreate:
    """``data`` with ``method`` set from the template's ``merge_method`` (unchanged without a
    template); ``InvalidInput`` naming the key for a bad template."""
    if data.mergekit is None:
        return data
    raw = load_yaml(data.mergekit)
    if data.params or data.search:
        raise InvalidInput(f"policy '{data.name}': a 'mergekit' template takes no 'params' or "
                           "'search'")  # fmt: skip
    resolve_config(session, raw)  # refused keys; explicit references must exist now
    check_config({**raw, "models": _PLACEHOLDERS} if _fills_models(raw) else raw)
    method = str(raw["merge_method"])
    if data.method and data.method != method:
        raise InvalidInput(f"policy '{data.name}': method '{data.method}' differs from the "
                           f"template's merge_method '{method}'")  # fmt: skip
    return data.model_copy(update={"method": method})


def template_request(
    *, policy: MergePolicy, chosen: Sequence[Checkpoint], base_id: int | None
) -> merge_runs.MergeRequest | None:
    """The run request of a template policy for ``chosen`` (None: the policy has no template)."""
    if policy.mergekit is None:
        return None
    config = load_yaml(policy.mergekit)
    if _fills_models(config):
        config["models"] = [{"model": f"{PREFIX}{c.id}"} for c in chosen]
        if base_id is not None and config.get("base_model") is None:
            config["base_model"] = f"{PREFIX}{base_id}"
    return merge_runs.MergeRequest(mergekit=config, evaluator=policy.evaluator)
