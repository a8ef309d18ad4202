"""The API docs work offline: Swagger UI and ReDoc pages reference only the registry's own URLs,
every asset they name answers 200 from the registry, and ``/docs`` redirects to them."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.registry.conftest import LiveRegistry

REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


def referenced_urls(html: str) -> list[str]:
    """Every src=, href= and Swagger ``url:`` value of a page."""
    return [a or b for a, b in REFERENCE.findall(html)]


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/api/v1/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
        ("/api/v1/redoc", {"redoc.standalone.js", "favicon.png"}),
    ],
)
def test_docs_pages_use_only_local_assets(
    live_registry: LiveRegistry, page: str, assets: set[str]
) -> None:
    with httpx.Client(base_url=live_registry.url, timeout=30) as http:
        response = http.get(page)
        assert response.status_code == 200
        html = response.text
        assert "http://" not in html and "https://" not in html  # no CDN, no web fonts
        urls = referenced_urls(html)
        assert {url.rsplit("/", 1)[-1] for url in urls} >= assets, urls
        for url in urls:
            assert url.startswith("/api/v1/"), url
            fetched = http.get(url)
            assert fetched.status_code == 200, url
            assert len(fetched.content) > 1000, url  # the real file, not an error page
        spec = http.get("/api/v1/openapi.json")
        assert spec.status_code == 200 and spec.json()["info"]["title"] == "ckreg registry"


def test_short_docs_paths_redirect(live_registry: LiveRegistry) -> None:
    with httpx.Client(base_url=live_registry.url, timeout=30) as http:
        for short, target in (("/docs", "/api/v1/docs"), ("/redoc", "/api/v1/redoc")):
            response = http.get(short)
            assert response.status_code == 307 and response.headers["location"] == target
            assert http.get(short, follow_redirects=True).status_code == 200


def test_swagger_bundle_is_the_real_swagger_ui(live_registry: LiveRegistry) -> None:
    bundle = httpx.get(f"{live_registry.url}/api/v1/docs-assets/swagger-ui-bundle.js", timeout=30)
    assert "SwaggerUIBundle" in bundle.text
    assert bundle.headers["content-type"].startswith(("application/javascript", "text/javascript"))
