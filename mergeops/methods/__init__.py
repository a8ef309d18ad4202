"""Merge methods: thin adapters over ``mergeops.ops`` in an explicit registry.

Importing this package registers every method; look them up with ``get_method(name)``.
"""

from mergeops.methods import (  # noqa: F401 - imported to register the methods
    consensus,
    dare,
    ffg,
    fisher,
    fw,
    linear,
    mwa,
    opcm,
    ota,
    tall,
    task_arithmetic,
    ties,
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
