"""GET /ui: the search page (plain HTML, CSS and JavaScript from package data; no CDN, no
build step). It calls the public API from the browser, with the API key the user types."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.docs import STATIC

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def search_page() -> FileResponse:
    return FileResponse(STATIC / "ui" / "index.html", media_type="text/html")
