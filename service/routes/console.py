"""The web console at `/`: static HTML, JavaScript and CSS shipped inside the package (no CDN, no
build step); the page talks to the same origin's JSON API like any other client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parents[1] / "console"


def mount(app: FastAPI) -> None:
    """Serve the console page at `/` and its assets under `/console/`."""

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        """The console page (it needs no key; the API calls it makes do when keys are set)."""
        return FileResponse(ASSETS / "index.html", media_type="text/html")

    app.mount("/console", StaticFiles(directory=ASSETS), name="console")
