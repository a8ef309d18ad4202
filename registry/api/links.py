"""OpenAPI links: the id a create route answers with feeds every route that takes that id.

``POST /checkpoints`` links to each ``{checkpoint_id}`` route, ``POST /policies`` to each
``{policy_id}`` route and ``POST /merges`` to ``GET /merges/{run_id}``, so clients and
stateful API testers (schemathesis) can chain calls on real objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# (path, method, status of the answer carrying the new object's ``id``) -> path parameter
CREATES: dict[tuple[str, str, str], str] = {
    ("/api/v1/checkpoints", "post", "201"): "checkpoint_id",
    ("/api/v1/policies", "post", "201"): "policy_id",
    ("/api/v1/merges", "post", "202"): "run_id",
}


def _links_to(schema: dict[str, Any], parameter: str) -> dict[str, Any]:
    links: dict[str, Any] = {}
    for path, operations in schema.get("paths", {}).items():
        if "{" + parameter + "}" not in path:
            continue
        for operation in operations.values():
            operation_id = operation.get("operationId")
            if operation_id:
                links[operation_id] = {
                    "operationId": operation_id,
                    "parameters": {f"path.{parameter}": "$response.body#/id"},
                }
    return links


def add_links(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with the links of ``CREATES`` added to the create routes' answers."""
    for (path, method, status), parameter in CREATES.items():
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is None or status not in operation.get("responses", {}):
            continue
        operation["responses"][status]["links"] = _links_to(schema, parameter)
    return schema


def with_links(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wrap ``FastAPI.openapi`` so the (cached) schema carries the links."""

    def openapi() -> dict[str, Any]:
        return add_links(build())

    return openapi
