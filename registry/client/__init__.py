"""The client side of ckreg: the REST client, the ``ckreg`` registry commands and optimizer
capture. Training jobs use only this package; it never touches the database or the store."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use: ``registry.client.cli`` (``ckreg --help``) must not pull in torch,
# which the safetensors checks behind ``Client`` import.
if TYPE_CHECKING:
    from registry.client.api import Client
    from registry.client.layouts import LayoutError
    from registry.client.transport import ClientError

_LAZY = {
    "Client": "registry.client.api",
    "ClientError": "registry.client.transport",
    "LayoutError": "registry.client.layouts",
}

__all__ = ["Client", "ClientError", "LayoutError"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'registry.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
