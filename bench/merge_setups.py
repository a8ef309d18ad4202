"""Per-method settings of the merge-engine benchmark's mergekit rows (``--methods mergekit``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setup:
    """How a method is configured in the benchmark: base or not, how many fine-tunes, the
    per-model params besides ``weight`` (None: no weight either) and the global params."""

    base: bool = True
    models: int = 4
    per_model: dict[str, float] | None = None
    shared: dict[str, object] | None = None


MERGEKIT_SETUPS: dict[str, Setup] = {
    "linear": Setup(base=False, per_model={}),
    "task_arithmetic": Setup(per_model={}),
    "ties": Setup(per_model={"density": -1}),  # -1: --density
    "dare_ties": Setup(per_model={"density": -1}),
    "dare_linear": Setup(per_model={"density": -1}),
    "breadcrumbs": Setup(per_model={"density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": Setup(per_model={"density": 0.9, "gamma": 0.01}),
    "della": Setup(per_model={"density": -1, "epsilon": 0.1}),
    "della_linear": Setup(per_model={"density": -1, "epsilon": 0.1}),
    "sce": Setup(shared={"select_topk": 0.5}),
    "ram": Setup(),
    "ramplus_tl": Setup(),
    "slerp": Setup(models=1, shared={"t": 0.4}),
    "nuslerp": Setup(base=False, models=2, per_model={}),
    "multislerp": Setup(base=False, per_model={}),
    "karcher": Setup(base=False),
    "model_stock": Setup(models=3),
    "nearswap": Setup(models=1, shared={"t": 0.001}),
    "arcee_fusion": Setup(models=1),
    "passthrough": Setup(base=False, models=1),
}
"""Every merge method mergekit 0.1.5 registers, with parameters valid in both engines."""


CKREG_VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "ties_position": ("ties", {"tie_break": "position"}),
    "breadcrumbs_position": ("breadcrumbs", {"tie_break": "position"}),
    "breadcrumbs_ties_position": ("breadcrumbs_ties", {"tie_break": "position"}),
}
"""ckreg-only rows: a name for the table -> (merge_method, extra global params). mergekit has
no such option (its ties and breadcrumbs keep whichever tied entries its unstable sort puts
first), so these
rows run ckreg alone on the same files; ``Setup`` is the method's."""


def setup_of(method: str) -> Setup:
    """The ``Setup`` of a method or of a ckreg variant's method."""
    return MERGEKIT_SETUPS.get(CKREG_VARIANTS.get(method, (method, {}))[0], Setup(per_model={}))


def mergekit_methods() -> list[str]:
    """The registered ckreg methods that mergekit also has, in ``MERGEKIT_SETUPS`` order."""
    from mergeops import available_methods

    ours = set(available_methods())
    return [m for m in MERGEKIT_SETUPS if m in ours]
