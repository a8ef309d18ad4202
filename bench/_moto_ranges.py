"""``moto_server`` that answers a single-range GET by reading only that range.

Stock moto (5.x) builds every GET from the object's whole value and then slices it, so a 1 MiB
Range request on a 256 MiB object reads and copies 256 MiB inside the mock: row-slice reads then
measure moto, not the client. Real S3 serves a range at the cost of the range. This launcher
patches that one path (``bytes=a-b`` with no ``partNumber``; every other request, errors and
open-ended ranges included, is moto's own), adds ``bench.moto_server``'s thread-safety fixes
and runs moto's server:

    python -m bench._moto_ranges -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any

from moto.s3 import models, responses
from moto.server import main

from bench.moto_server import patch as patch_thread_safety

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_span = threading.local()
_whole_value = models.FakeKey.value


def _value(self: Any) -> bytes:
    span = getattr(_span, "range", None)
    if span is None:
        return _whole_value.fget(self)  # type: ignore[no-any-return]
    begin, end = span
    with self.lock:
        self._value_buffer.seek(begin)
        return self._value_buffer.read(end - begin + 1)  # type: ignore[no-any-return]


_stock_get_object = responses.S3Response.get_object


def _get_object(self: Any) -> Any:
    match = _RANGE.fullmatch(self.headers.get("range", "") or "")
    if match is None or self._get_int_param("partNumber"):
        return _stock_get_object(self)
    key, _ = self._get_key()
    begin, end = int(match[1]), min(int(match[2]), key.size - 1)
    if begin > end:
        return _stock_get_object(self)
    _span.range = (begin, end)
    try:
        status, headers, body = _stock_get_object(self)
    finally:
        _span.range = None
    if status != 200:
        return status, headers, body
    for name in [h for h in headers if h.startswith("x-amz-checksum-")]:
        del headers[name]
    headers["content-range"] = f"bytes {begin}-{end}/{key.size}"
    headers["content-length"] = str(len(body))
    return 206, headers, body


models.FakeKey.value = property(_value, _whole_value.fset)  # type: ignore[method-assign,assignment]
responses.S3Response.get_object = _get_object  # type: ignore[method-assign]

if __name__ == "__main__":
    patch_thread_safety()
    sys.exit(main())
