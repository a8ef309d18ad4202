"""Merge methods: thin adapters over ``mergeops.ops`` in an explicit registry.

Methods live one per module in family folders (``averaging/``, ``task_vector/``, ``masks/``,
``curvature/``, ``activation/``, ``subspace/``, ``data_driven/``, ``alignment/``, ``moe/``,
``continual/``); importing this package imports every family, which registers every method.
Look methods up with ``get_method(name)``.
"""

from mergeops.methods import (  # noqa: F401 - imported to register the methods
    activation,
    alignment,
    averaging,
    continual,
    curvature,
    data_driven,
    masks,
    moe,
    subspace,
    task_vector,
)
from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MergeMethod,
    Need,
    StreamingMethod,
    WholeModelMethod,
    available_methods,
    get_method,
    register,
)

__all__ = [
    "MergeContext",
    "MergeError",
    "MergeMethod",
    "Need",
    "StreamingMethod",
    "WholeModelMethod",
    "available_methods",
    "get_method",
    "register",
]
