"""The one line server-side commands print first: which database and home they use.

``token create`` run from the wrong folder used to write into ``./.ckreg`` silently; this line
(on stderr, so a printed token stays alone on stdout) says where the data goes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from registry.settings import Settings

_PASSWORD = re.compile(r"(://[^:/@]+:)[^@/]+@")


def masked_url(url: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db`` (other URLs unchanged)."""
    return _PASSWORD.sub(r"\1***@", url)


def database_line(settings: Settings) -> str:
    """``using database URL (CKREG_DATABASE_URL unset; CKREG_HOME=/abs/.ckreg)``."""
    given = settings.model_fields_set
    source = "from CKREG_DATABASE_URL" if "database_url" in given else "CKREG_DATABASE_URL unset"
    home = settings.home.resolve()
    where = f"CKREG_HOME={home}" if "home" in given else f"CKREG_HOME unset, so {home}"
    return f"using database {masked_url(settings.database_url)} ({source}; {where})"


def current_settings() -> Settings:
    """The registry's settings, imported on first use: ``ckreg merge`` and the other local
    commands never load the settings model (pydantic-settings, ~60 ms of start-up)."""
    from registry.settings import get_settings

    return get_settings()


def echo_database(settings: Settings) -> None:
    """Print ``database_line`` to stderr."""
    typer.echo(database_line(settings), err=True)
