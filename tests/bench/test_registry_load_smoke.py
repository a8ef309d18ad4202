"""Tiny run of ``bench.registry_load`` (2 clients, 2 s, SQLite + file store), so it keeps
working; not a performance test."""

from __future__ import annotations

import pytest

from bench import registry_load

pytestmark = pytest.mark.timeout(180)


def test_registry_load_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    short = ["--warmup", "0.5", "--reference-duration", "0.5", "--idle-timeout", "0"]
    code = registry_load.main(["--clients", "2", "--duration", "2", "--write-share", "0.5", *short])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 errors" in out and " 0 mismatches" in out, out
    for operation in ("create", "put", "complete", "list", "download", "healthz (reference)"):
        assert f"\n{operation} " in out, out
    assert "\nregistry (ckreg serve + children) " in out and "load average during mix" in out, out
