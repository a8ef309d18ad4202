"""Training-framework integrations of the ckreg client: ``CkregCallback`` for
``transformers.Trainer`` registers each checkpoint as it is saved.

Imported on first use: ``registry.client.integrations`` itself never imports transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.client.integrations.hf_trainer import CkregCallback

__all__ = ["CkregCallback"]


def __getattr__(name: str) -> Any:
    if name != "CkregCallback":
        raise AttributeError(f"module 'registry.client.integrations' has no attribute {name!r}")
    value = importlib.import_module("registry.client.integrations.hf_trainer").CkregCallback
    globals()[name] = value
    return value
