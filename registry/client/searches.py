"""Client calls for merge searches (``/policies/{id}/searches``, ``/searches``)."""

from __future__ import annotations

import time
from typing import Any

from registry.client.transport import BaseClient

SEARCH_ENDED = frozenset({"finished", "cancelled", "failed"})


class SearchesMixin(BaseClient):
    """Start, watch and cancel the merge searches of search policies."""

    def start_search(self, policy_id: int, *, resume: bool = True) -> dict[str, Any]:
        """Queue the policy's search; a cancelled or failed one is resumed unless ``resume``
        is False. 409 (``ClientError``) when the policy has a search queued or running."""
        return self._json("POST", f"/policies/{policy_id}/searches", json={"resume": resume})

    def search(self, search_id: int) -> dict[str, Any]:
        """A search's status and progress."""
        return self._json("GET", f"/searches/{search_id}")

    def searches(self, **filters: Any) -> dict[str, Any]:
        """A page of searches, newest first (``policy_id``, ``status``, ``limit``, ``offset``)."""
        params = {k: v for k, v in filters.items() if v is not None}
        return self._json("GET", "/searches", params=params)

    def cancel_search(self, search_id: int) -> dict[str, Any]:
        """Stop a search (a running one at its next candidate)."""
        return self._json("POST", f"/searches/{search_id}/cancel")

    def wait_search(
        self, search_id: int, *, timeout: float = 3600.0, poll_s: float = 1.0
    ) -> dict[str, Any]:
        """Poll until the search has finished, been cancelled or failed (``TimeoutError``)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.search(search_id)
            if found["status"] in SEARCH_ENDED:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"search {search_id} still {found['status']} after {timeout} s")
            time.sleep(poll_s)
