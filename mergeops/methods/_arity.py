"""Input-count checks shared by mergekit's fixed-arity methods (slerp, nearswap, arcee_fusion,
nuslerp, model_stock, passthrough)."""

from __future__ import annotations

from mergeops.methods.base import MergeContext, MergeError


def require_model_count(ctx: MergeContext, *, exactly: int | None = None, least: int = 1) -> None:
    """Raise ``MergeError`` naming the count and the models unless ``ctx`` has the right number
    of models besides the base (``exactly`` of them, or at least ``least``)."""
    count = len(ctx.model_names)
    if exactly is not None and count != exactly:
        wanted = f"exactly {exactly} model{'s' if exactly != 1 else ''}"
    elif count < least:
        wanted = f"at least {least} models"
    else:
        return
    besides = " besides the base" if ctx.has_base else ""
    raise MergeError(
        f"method '{ctx.method}' needs {wanted}{besides}; got {count}: "
        f"{', '.join(repr(n) for n in ctx.model_names) or 'none'}"
    )
