"""The one rule for text the registry stores: valid Unicode that the database and JSON round-trip.

A NUL character is refused by PostgreSQL; a lone surrogate (``"\\udfff"``, which JSON escapes can
produce) cannot be encoded as UTF-8, so a row holding one breaks every answer that lists it.
Request bodies and query strings (``registry.api.body_guard``) and uploaded safetensors headers
(``registry.safetensors_check``) are checked with ``text_problem``.
"""

from __future__ import annotations


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored and sent back as JSON (a NUL, a lone surrogate), or None."""
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (lone surrogate {text[exc.start]!r} at character {exc.start})"
    return None


def shown(text: str) -> str:
    """``text`` safe to put in an error message (surrogates and NUL escaped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
