"""The API docs, offline: Swagger UI at /docs and ReDoc at /redoc from package data, and
security schemes in the OpenAPI document so Swagger UI's "Authorize" sends the keys.

FastAPI's own pages load their scripts from a CDN (a blank page without network); these are
the same pages pointed at `/static/` (server/static/README.md: versions and licences).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import fastapi.routing
from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from server.routes.deps import require_admin_key, require_api_key
from wire import schema

STATIC = Path(__file__).resolve().parent / "static"
OAUTH_REDIRECT = "/docs/oauth2-redirect"
SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The API key (LPI_API_KEY): /embed, /index, /search, /points, /v1, "
        "GET /tasks. The admin key is accepted too.",
    },
    "adminKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin key (LPI_ADMIN_KEY; the API key when none is set): loading, "
        "promoting and unloading tasks.",
    },
}


def install_docs(app: FastAPI) -> None:
    """Mount /static and add /docs, /docs/oauth2-redirect, /redoc and the secured schema.

    `app` must be made with docs_url=None and redoc_url=None."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    title = f"{app.title} - API"

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=title,
            oauth2_redirect_url=OAUTH_REDIRECT,
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get(OAUTH_REDIRECT, include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url,
            title=title,
            redoc_js_url="/static/redoc/redoc.standalone.js",
            redoc_favicon_url="/static/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )

    app.openapi = lambda: _secured_openapi(app)


def _secured_openapi(app: FastAPI) -> dict:
    """FastAPI's schema, once, plus the two bearer schemes and each operation's key."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        document.setdefault("components", {})["securitySchemes"] = SCHEMES
        _add_missing_schemas(document)
        for route in _flat_routes(app):
            needs = _key_of(route)
            path = getattr(route, "path_format", None) or getattr(route, "path", "")
            for method in getattr(route, "methods", None) or ():
                operation = document["paths"].get(path, {}).get(method.lower())
                if operation is not None and needs:
                    operation["security"] = needs
        app.openapi_schema = document
    return app.openapi_schema


def _add_missing_schemas(document: dict) -> None:
    """Wire models named only by hand-written request bodies (routes that read JSON or other
    content types themselves: /embed, PUT /tasks) get their schemas too; ReDoc stops at a
    dangling reference."""
    schemas = document["components"].setdefault("schemas", {})
    template = "#/components/schemas/{model}"
    for name in sorted(
        set(re.findall(r'"#/components/schemas/([A-Za-z0-9_]+)"', json.dumps(document)))
    ):
        model = getattr(schema, name, None)
        if name in schemas or not isinstance(model, type) or not issubclass(model, BaseModel):
            continue
        found = model.model_json_schema(ref_template=template, mode="validation")
        for inner, definition in found.pop("$defs", {}).items():
            schemas.setdefault(inner, definition)
        schemas[name] = found


def _flat_routes(app: FastAPI) -> list:
    """Every route with its routers' dependencies (FastAPI >= 0.16x nests included routers;
    `iter_route_contexts` flattens them, as the schema itself does)."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(flatten(app.routes)) if flatten else list(app.routes)


def _key_of(route) -> list[dict]:
    checks = {d.dependency for d in getattr(route, "dependencies", [])}
    if require_admin_key in checks:
        return [{"adminKey": []}]
    if require_api_key in checks:
        return [{"apiKey": []}, {"adminKey": []}]
    return []
