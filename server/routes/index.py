"""GET /: a small JSON index (name, version, the backbone's source, where to look next).

JSON for programs; a browser (Accept preferring text/html) is sent to the search page.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from wire import schema

router = APIRouter()

LINKS = {
    "docs": "/docs",
    "redoc": "/redoc",
    "ui": "/ui",
    "openai": "/v1/models",
    "openapi": "/openapi.json",
    "tasks": "/tasks",
    "health": "/healthz",
    "ready": "/readyz",
    "metrics": "/metrics",
}


@router.get("/", response_model=schema.ServiceIndex)
async def index(request: Request):
    if _prefers_html(request.headers.get("accept", "")):
        return RedirectResponse("/ui", status_code=307)
    app = request.app
    return {
        "name": app.title,
        "version": app.version,
        "backbone_source": app.state.backbone_source,
        "links": LINKS,
    }


def _prefers_html(accept: str) -> bool:
    """text/html ranked above application/json (q-values, then order), as browsers send."""
    ranked = {}
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            ranked.setdefault(media.lower(), (float(q), -position))
        except ValueError:
            continue
    html = ranked.get("text/html", (0.0, 0))
    json_rank = max(ranked.get("application/json", (0.0, 0)), ranked.get("*/*", (0.0, 0)))
    return html[0] > 0 and html > json_rank
