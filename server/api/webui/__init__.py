"""The browser playground: `GET /` serves a single page (plain HTML, CSS and JavaScript shipped in this package under
`static/`, no build step, nothing fetched from other hosts) that talks to the server's own API: chat over SSE (free or
held to a JSON schema), summarize, classify, embeddings and rerank (a tab shown while `/v1/status` names an
embedding model), and a status strip polling `/v1/status`. `--no-webui` / `LOOM_WEBUI=false` leaves it out (then
`/` answers 404).

The page is public even when an API key is set (it holds no data); it asks for the key and sends it as a bearer
token. A strict Content-Security-Policy (scripts and styles from this origin only, no inline script) backs up the
page's own rule of never parsing model or user text as HTML."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).with_name("static")
ASSETS_PATH = "/webui"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}  # revalidate (ETag): an upgraded server serves its own page at once


class Assets(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


def install_webui(app: FastAPI) -> None:
    """Serve the playground at `/` and its assets under `/webui/`."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    app.mount(ASSETS_PATH, Assets(directory=STATIC), name="webui")
