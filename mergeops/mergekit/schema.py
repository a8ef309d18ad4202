"""mergekit 0.1.5's merge YAML as frozen pydantic models, plus ckreg's extensions.

mergekit keys: ``merge_method``, ``base_model``, exactly one of ``models`` / ``slices`` /
``modules``, ``parameters``, ``dtype`` (compute dtype), ``out_dtype``, ``tokenizer_source``,
``tokenizer``, ``chat_template``. Parameter values are scalars, gradients or ``filter:`` lists
(``mergeops.mergekit.gradients``). ckreg's extensions: per model ``name``, ``metric``,
``second_moment``, ``fisher``; top level ``objective``, ``evaluator``, ``state``,
``max_shard_size``, ``device``, ``seed`` (alias ``random_seed``, mergekit's ``--random-seed``),
``lora`` and ``conventions`` (``mergekit``, the default: omitted params take mergekit's
defaults and the merge computes in ``dtype``; ``ckreg``: ckreg's defaults, float32 compute).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from mergeops.mergekit.gradients import check_setting
from mergeops.methods.base import MergeError

_FROZEN = ConfigDict(frozen=True, extra="forbid")


def _check_parameters(value: dict[str, Any] | None, where: str) -> dict[str, Any]:
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"a mapping of parameter names to values, got {value!r:.80}")
    for key, setting in (value or {}).items():
        check_setting(key, setting, where)
    return dict(value or {})


class InputModel(BaseModel):
    """One ``models[]`` entry: a model reference (``path`` or ``path+lora``) and its params."""

    model_config = _FROZEN
    model: str
    parameters: dict[str, Any] = {}
    name: str | None = None
    metric: float | None = None
    second_moment: str | None = None
    fisher: str | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> dict[str, Any]:
        return _check_parameters(value, "parameters")


class SliceSource(BaseModel):
    """One ``slices[].sources[]`` entry: layers ``[start, end)`` of a model."""

    model_config = _FROZEN
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = {}

    @field_validator("parameters", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> dict[str, Any]:
        return _check_parameters(value, "parameters")

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got "
                             f"{list(value)}")  # fmt: skip
        return value


class OutputSlice(BaseModel):
    """One ``slices[]`` entry: sources of equal layer count, an optional base and params."""

    model_config = _FROZEN
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, Any] = {}
    residual_weight: float | None = None  # accepted and unused, as in mergekit 0.1.5

    @field_validator("parameters", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> dict[str, Any]:
        return _check_parameters(value, "parameters")

    @model_validator(mode="after")
    def _same_lengths(self) -> OutputSlice:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, "
                             f"got {sorted(lengths)}")  # fmt: skip
        return self

    @property
    def num_layers(self) -> int:
        first = self.sources[0].layer_range
        return first[1] - first[0]


class MergeConfig(BaseModel):
    """A parsed merge YAML (mergekit's schema and ckreg's extensions)."""

    model_config = _FROZEN
    merge_method: str
    models: list[InputModel] = []
    slices: list[OutputSlice] = []
    base_model: str | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None
    chat_template: str | None = None
    conventions: Literal["mergekit", "ckreg"] = "mergekit"
    objective: str | None = None
    evaluator: str | None = None
    state: str | None = None
    max_shard_size: int | str = "5GB"
    device: str = "auto"
    seed: int = 0
    lora: Literal["factors", "delta", "full"] = "factors"

    @field_validator("parameters", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> dict[str, Any]:
        return _check_parameters(value, "parameters")

    @model_validator(mode="after")
    def _one_layout(self) -> MergeConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices'")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        return self

    @property
    def is_mergekit(self) -> bool:
        return self.conventions == "mergekit"


_MODULES_REASON = (
    "mergekit 'modules' (one config per module of a multi-module model, e.g. a vision tower "
    "and a text decoder) is not supported: ckreg's layer naming knows one decoder stack; "
    "merge single-module checkpoints with 'models' or 'slices'"
)


def parse(data: Any) -> MergeConfig:
    """Validate a config mapping; raises ``MergeError`` naming the bad key."""
    if not isinstance(data, dict):
        raise MergeError("a merge config must be a mapping with 'merge_method' and 'models'")
    if "modules" in data:
        raise MergeError(_MODULES_REASON)
    cleaned = dict(data)
    if "random_seed" in cleaned:
        if "seed" in cleaned:
            raise MergeError("give either 'seed' or 'random_seed', not both")
        cleaned["seed"] = cleaned.pop("random_seed")
    cleaned["models"] = [
        {"model": m} if isinstance(m, str) else m for m in cleaned.get("models") or []
    ]
    try:
        return MergeConfig.model_validate(cleaned)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise MergeError(f"bad merge config: {problems}") from None


def _problem(error: Any) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{loc}: {message}" if loc else message
