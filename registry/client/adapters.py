"""Registering an extracted LoRA adapter folder as kind ``adapter`` of its base (the hook behind
``ckreg extract-lora --register``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def register_adapter(
    path: Path,
    *,
    base_id: int,
    name: str | None = None,
    url: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Upload ``path`` (a PEFT adapter folder) as an adapter of checkpoint ``base_id``; returns it.

    Server and connection errors become a one-line message and exit code 1, as in ``ckreg register``.
    """
    from registry.client.cli import _client

    with _client(url, token) as client:
        return client.register(
            path,
            name=name or Path(path).name,
            kind="adapter",
            base_id=base_id,
            metadata={"extracted_by": "ckreg extract-lora"},
            progress=False,
        )
