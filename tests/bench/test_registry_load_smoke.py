"""Tiny run of ``bench.registry_load`` (2 clients, 2 s, SQLite + file store), so it keeps
working; not a performance test."""

from __future__ import annotations

import pytest

from bench import registry_load

pytestmark = pytest.mark.timeout(180)


def test_registry_load_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    code = registry_load.main(["--clients", "2", "--duration", "2", "--write-share", "0.5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 errors" in out and " 0 mismatches" in out, out
    for operation in ("create", "put", "complete", "list", "download"):
        assert f"\n{operation} " in out, out
