"""Merge runs from a mergekit YAML: checkpoint references resolved and the config validated.

Where mergekit takes a model path, the registry takes a checkpoint reference:

- an id: ``12``, ``"12"`` or ``ckreg/12``;
- a name: ``ckreg/my-ft`` (or ``my-ft``): the newest ready checkpoint with that name (highest
  id), resolved once, when the run is created.

References are read in ``base_model``, ``models[].model``, ``slices[].base_model``,
``slices[].sources[].model``, ``tokenizer_source`` and ``tokenizer.source`` (``union`` and
``base`` stay as they are), ``tokenizer.tokens.<t>.source.model``; ``a+b`` is a model with a
LoRA adapter folded in (both references). The stored config names every model ``ckreg/<id>``,
so a run is reproducible (and its idempotency key fixed) whatever is registered later. Keys that
would reach the server's filesystem or import code (``state``, ``objective``, ``evaluator``,
``models[].second_moment``/``fisher``) are refused. The YAML schema is mergekit 0.1.5's
(``mergeops.mergekit.schema``); see docs/mergekit.md, "In the registry".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import ValidationError
from sqlmodel import Session, col, select

from mergeops.methods import base as mb
from registry.errors import InvalidInput
from registry.models import Checkpoint, CheckpointStatus
from registry.services.validation import check_text

PREFIX = "ckreg/"
MAX_YAML_CHARS = 256 * 1024
MAX_DEPTH = 32  # nesting levels of a YAML config (a real one needs under 10)
#: Config keys that name server-side files or code: refused in the registry.
REFUSED = {
    "state": "a server-side state file",
    "objective": "code to import on the server",
    "evaluator": "give the run's evaluator as the request's 'evaluator'",
}
REFUSED_PER_MODEL = ("second_moment", "fisher")
#: What a registry mergekit run cannot provide (its side inputs come from artifacts).
UNSUPPORTED_NEEDS = {
    mb.Need.OBJECTIVE,
    mb.Need.STATE,
    mb.Need.SECOND_MOMENTS,
    mb.Need.FISHER,
    mb.Need.METRICS,
    mb.Need.GRAMS,
}
_ID = re.compile(r"^[0-9]{1,18}$")


def load_yaml(value: str | dict[str, Any]) -> dict[str, Any]:
    """The config mapping of a YAML text (or a mapping given as is); ``InvalidInput`` otherwise."""
    if isinstance(value, str):
        if len(value) > MAX_YAML_CHARS:
            raise InvalidInput(f"mergekit: the YAML is longer than {MAX_YAML_CHARS} characters")
        try:
            _check_tokens(value)
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise InvalidInput(f"mergekit: not valid YAML: {exc}") from None
        _check_plain(value)
    if not isinstance(value, dict):
        raise InvalidInput("mergekit: the config must be a mapping with 'merge_method'")
    return dict(value)


_OPEN = (
    yaml.BlockMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.FlowSequenceStartToken,
)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _check_tokens(text: str) -> None:
    """Refuse aliases, and nesting deeper than ``MAX_DEPTH`` (naming the key where it starts)
    before the (recursive) YAML parser meets it."""
    keys: list[str] = []  # the last key seen at each open level
    after_key = False
    for token in yaml.scan(text):
        if isinstance(token, yaml.AliasToken):
            raise InvalidInput("mergekit: YAML aliases (*name) are not accepted")
        if isinstance(token, _OPEN):
            keys.append("")
            if len(keys) > MAX_DEPTH:
                where = ".".join(k for k in keys if k)[:120] or "the config"
                raise InvalidInput(f"mergekit: {where}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(token, _CLOSE) and keys:
            keys.pop()
        elif isinstance(token, yaml.ScalarToken) and after_key and keys:
            keys[-1] = str(token.value)
        after_key = isinstance(token, yaml.KeyToken)


def _check_plain(value: Any) -> None:
    """Refuse what JSON cannot hold (``!!binary``, dates, sets, non-text keys), naming the key."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidInput(f"mergekit: {where or 'the config'}: key {key!r} is "
                                       f"not text ({type(key).__name__})")  # fmt: skip
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
        elif item is not None and not isinstance(item, str | int | float):
            raise InvalidInput(f"mergekit: {where}: {type(item).__name__} values are not "
                               "accepted; use plain scalars, lists and mappings")  # fmt: skip


def find_checkpoint(session: Session, ref: Any, *, key: str) -> Checkpoint:
    """The ready checkpoint ``ref`` names (see the module doc); ``InvalidInput`` naming ``key``."""
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise InvalidInput(f"mergekit: {key}: a checkpoint id or name, got {ref!r}")
    text = str(ref).strip().removeprefix(PREFIX)
    check_text(text, what=f"mergekit: {key}: checkpoint")
    if _ID.match(text):
        found = session.get(Checkpoint, int(text))
        if found is None:
            raise InvalidInput(f"mergekit: {key}: no checkpoint with id {text}")
        if found.status != CheckpointStatus.ready:
            raise InvalidInput(
                f"mergekit: {key}: checkpoint {text} ('{found.name}') is {found.status}, not ready"
            )
        return found
    query = (
        select(Checkpoint)
        .where(Checkpoint.name == text, Checkpoint.status == CheckpointStatus.ready)
        .order_by(col(Checkpoint.id).desc())
    )
    found = session.exec(query).first()
    if found is None:
        raise InvalidInput(f"mergekit: {key}: no ready checkpoint named '{text}'")
    return found


class _Resolver:
    """Rewrites references to ``ckreg/<id>``, remembering the ids in order of appearance."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.ids: list[int] = []

    def __call__(self, ref: Any, key: str) -> str:
        parts = ref.split("+") if isinstance(ref, str) and "+" in ref else [ref]
        if len(parts) > 2:
            raise InvalidInput(f"mergekit: {key}: at most one '+lora' in {ref!r}")
        out = []
        for part in parts:
            checkpoint = find_checkpoint(self.session, part, key=key)
            checkpoint_id = checkpoint.id or 0
            if checkpoint_id not in self.ids:
                self.ids.append(checkpoint_id)
            out.append(f"{PREFIX}{checkpoint_id}")
        return "+".join(out)


def resolve_config(session: Session, raw: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """``raw`` with every reference as ``ckreg/<id>``, and the referenced ids in order."""
    for key, why in REFUSED.items():
        if key in raw:
            raise InvalidInput(f"mergekit: {key}: not accepted in the registry ({why})")
    resolve = _Resolver(session)
    config = dict(raw)
    if config.get("base_model") is not None:
        config["base_model"] = resolve(config["base_model"], "base_model")
    config["models"] = [_model(e, i, resolve) for i, e in enumerate(_list(config, "models"))]
    if not config["models"]:
        del config["models"]
    config["slices"] = [_slice(s, i, resolve) for i, s in enumerate(_list(config, "slices"))]
    if not config["slices"]:
        del config["slices"]
    if config.get("tokenizer_source") not in (None, "union", "base"):
        config["tokenizer_source"] = resolve(config["tokenizer_source"], "tokenizer_source")
    if isinstance(config.get("tokenizer"), dict):
        config["tokenizer"] = _tokenizer(config["tokenizer"], resolve)
    return config, resolve.ids


def _list(config: dict[str, Any], key: str) -> list[Any]:
    value = config.get(key) or []
    if not isinstance(value, list):
        raise InvalidInput(f"mergekit: {key}: a list, got {type(value).__name__}")
    return value


def _model(entry: Any, i: int, resolve: Callable[[Any, str], str]) -> dict[str, Any]:
    where = f"models[{i}]"
    if not isinstance(entry, dict):
        return {"model": resolve(entry, f"{where}.model")}
    for key in REFUSED_PER_MODEL:
        if key in entry:
            raise InvalidInput(f"mergekit: {where}.{key}: not accepted in the registry "
                               "(side inputs come from the checkpoints' artifacts)")  # fmt: skip
    if "model" not in entry:
        raise InvalidInput(f"mergekit: {where}.model: missing")
    return {**entry, "model": resolve(entry["model"], f"{where}.model")}


def _slice(entry: Any, i: int, resolve: Callable[[Any, str], str]) -> Any:
    where = f"slices[{i}]"
    if not isinstance(entry, dict):
        return entry  # the schema names the problem
    out = dict(entry)
    if out.get("base_model") is not None:
        out["base_model"] = resolve(out["base_model"], f"{where}.base_model")
    sources = out.get("sources") or []
    if isinstance(sources, list):
        out["sources"] = [
            {**s, "model": resolve(s["model"], f"{where}.sources[{j}].model")}
            if isinstance(s, dict) and "model" in s
            else s
            for j, s in enumerate(sources)
        ]
    return out


def _tokenizer(block: dict[str, Any], resolve: Callable[[Any, str], str]) -> dict[str, Any]:
    out = dict(block)
    if out.get("source") not in (None, "union", "base"):
        out["source"] = resolve(out["source"], "tokenizer.source")
    tokens = out.get("tokens")
    if isinstance(tokens, dict):
        fixed = {}
        for token, spec in tokens.items():
            source = spec.get("source") if isinstance(spec, dict) else None
            if isinstance(source, dict) and "model" in source:
                key = f"tokenizer.tokens[{token!r}].source.model"
                spec = {**spec, "source": {**source, "model": resolve(source["model"], key)}}
            fixed[token] = spec
        out["tokens"] = fixed
    return out


def check_config(config: dict[str, Any]) -> None:
    """Validate a resolved config with ckreg's mergekit schema and the method's params."""
    import mergeops.methods  # noqa: F401 - registers every method
    from mergeops.config import parse_config
    from mergeops.mergekit.plan import IGNORABLE

    try:
        parsed = parse_config(config)
    except mb.MergeError as exc:
        raise InvalidInput(f"mergekit: {exc}") from None
    try:
        method = mb.get_method(parsed.merge_method)
    except mb.MergeError as exc:
        raise InvalidInput(f"mergekit: merge_method: {exc}") from None
    missing = UNSUPPORTED_NEEDS & set(method.needs)
    if missing:
        names = ", ".join(sorted(str(n.value) for n in missing))
        raise InvalidInput(f"mergekit: merge_method: '{method.name}' needs {names}, which a "
                           "registry mergekit run cannot provide; use the JSON form")  # fmt: skip
    accepted = mb._field_names(method.params_model) | mb._field_names(method.model_params_model)
    scopes = [("parameters", parsed.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(parsed.models)]
    for i, piece in enumerate(parsed.slices):
        scopes.append((f"slices[{i}].parameters", piece.parameters))
        scopes += [(f"slices[{i}].sources[{j}].parameters", s.parameters)
                   for j, s in enumerate(piece.sources)]  # fmt: skip
    for where, params in scopes:
        for key, value in params.items():
            if key not in accepted and key not in IGNORABLE:
                known = ", ".join(sorted(accepted)) or "none"
                raise InvalidInput(f"mergekit: {where}.{key}: unknown parameter of "
                                   f"'{method.name}' (accepted: {known})")  # fmt: skip
            if key not in IGNORABLE:
                _check_value(method, f"{where}.{key}", key, value)


def _check_value(method: mb.MergeMethod, where: str, key: str, value: Any) -> None:
    """Each value a parameter may take (a scalar, a gradient's points, a filter's values)
    validates against the method's field for ``key``; else a 422 naming the key."""
    models = [m for m in (method.params_model, method.model_params_model)
              if key in mb._field_names(m)]  # fmt: skip
    for scalar in _scalars(value):
        try:
            models[0].model_validate({key: scalar})
        except ValidationError as exc:
            # errors on other fields are required fields left out of this one-key probe
            problems = [e["msg"] for e in exc.errors() if tuple(e["loc"]) == (key,)]
            if problems:
                raise InvalidInput(f"mergekit: {where}: {problems[0]} (got {scalar!r})") from None


def _scalars(value: Any) -> list[Any]:
    """The scalar values in a mergekit parameter: itself, a gradient's points, or the values
    of a filter list (``[{filter: ..., value: ...}, ...]``), recursively."""
    if isinstance(value, dict):
        return _scalars(value["value"]) if "value" in value else [value]
    if isinstance(value, list):
        return [s for item in value for s in _scalars(item)]
    return [value]


def base_id_of(config: dict[str, Any]) -> int | None:
    """The checkpoint id of a resolved config's ``base_model``."""
    base = config.get("base_model")
    return int(str(base).split("+")[0].removeprefix(PREFIX)) if base else None
