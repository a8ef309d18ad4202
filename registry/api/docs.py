"""Interactive API docs that work offline: Swagger UI at ``/api/v1/docs`` and ReDoc at
``/api/v1/redoc``, their scripts and styles served by the registry itself (the files ship in the
``fastapi-offline`` package) instead of a CDN; ``/docs`` and ``/redoc`` redirect there."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles


def assets_dir() -> Path:
    """The folder of ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js``."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI, *, prefix: str) -> None:
    """Serve the docs pages and their assets under ``prefix`` (create the app with
    ``docs_url=None, redoc_url=None``); ``/docs`` and ``/redoc`` redirect to them."""
    assets = f"{prefix}/docs-assets"
    title = f"{app.title} - API docs"
    openapi_url = app.openapi_url or f"{prefix}/openapi.json"
    oauth2_redirect = f"{prefix}/docs/oauth2-redirect"
    app.mount(assets, StaticFiles(directory=assets_dir()), name="docs-assets")

    @app.get(f"{prefix}/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=title,
            oauth2_redirect_url=oauth2_redirect,
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(f"{prefix}/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=title,
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )

    for short, target in (("/docs", f"{prefix}/docs"), ("/redoc", f"{prefix}/redoc")):
        app.add_api_route(short, _redirect(target), include_in_schema=False)


def _redirect(target: str) -> object:
    def redirect() -> RedirectResponse:
        return RedirectResponse(target)

    return redirect
