"""The node's web application (ASGI, Starlette): every HTTP route the node serves, in one list.

``create_app`` builds it from the node's ``Services`` and its thumbnail renderer; ``routes`` below is the one
place where pages, APIs and mounted applications (DICOMweb) are added. Everything sits behind the configured
authentication.
Logs carry UIDs and status codes only, never patient names, IDs, accession numbers or report text.
"""
from __future__ import annotations

import base64
import binascii
import logging
import secrets
from dataclasses import asdict
from functools import partial

from jinja2 import Environment, PackageLoader
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config.settings import WebSettings
from dicom_node.errors import NodeError
from dicom_node.handlers import Services
from dicom_node.reference_sheet import SheetsDisabledError
from dicom_node.storage import check_uid
from dicom_node.web import dicomweb
from dicom_node.web.errors import RETRY_AFTER_S, http_error
from dicom_node.web.render import Renderer
from dicom_node.web.similar_page import find_answer, similar_request
from models.errors import ModelError

LOG = logging.getLogger(__name__)

VIEWER_NAMES = {"ohif": "OHIF", "stone": "Stone Web Viewer", "weasis": "Weasis"}
# The page runs no script, loads images from the node only, and sends no Referer (URLs carry study UIDs).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


_TEMPLATES = Environment(loader=PackageLoader("dicom_node.web", "templates"), autoescape=True)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", "")


def _error(request: Request, status: int, title: str, message: str) -> Response:
    """An error answer in the client's format (JSON for the API, HTML for a browser); a 503 says when to retry."""
    retry = {"Retry-After": RETRY_AFTER_S} if status == 503 else {}
    if _wants_json(request):
        return JSONResponse({"error": title, "detail": message}, status, headers=retry or None)
    page = _TEMPLATES.get_template("error.html").render(title=title, message=message)
    return HTMLResponse(page, status, headers={**PAGE_HEADERS, **retry})


class Pages:
    """The route handlers; plain functions, so Starlette runs them in its thread pool (catalog, files), except
    ``similar``: its search reads a few catalog rows (SQLite, WAL: readers do not wait for writers) and the
    in-memory index, and runs on the event loop, which saves the thread hop (~0.5 ms of CPU of ~3.3 per answer
    at 100k studies). A search with a findings filter may look through ``query.search_depth`` studies (~0.1 s at
    the default depth): it stays in the thread pool, so as not to stall every other request meanwhile."""

    def __init__(self, services: Services, renderer: Renderer) -> None:
        self.services = services
        self.renderer = renderer

    async def similar(self, request: Request) -> Response:
        """GET /studies/{uid}/similar, /similar?accession=..., and their /api/ twins."""
        options = dict(request.query_params)
        accession = options.pop("accession", "")
        study_uid = request.path_params.get("study_uid", "")
        if not study_uid and not accession:
            return _error(request, 400, "Bad request", "name a study: /studies/{StudyInstanceUID}/similar or "
                                                       "/similar?accession=...")
        try:
            identifier = similar_request(study_uid, accession, options)
            search = partial(find_answer, self.services, identifier,
                             lambda sop_uid: str(request.url_for("thumbnail", sop_uid=sop_uid).path))
            answer = await run_in_threadpool(search) if "findings" in options else search()
        except NodeError as error:
            http = http_error(error)
            LOG.info("similar page: %d %s", http.status, http.title)
            return _error(request, http.status, http.title, str(error))
        LOG.info("similar page: study %s, %d similar", answer.query.case.study_uid, len(answer.similar))
        if _wants_json(request):
            return JSONResponse(answer.as_json(), headers={"Cache-Control": "no-store"})
        page = _TEMPLATES.get_template("similar.html").render(
            answer=answer, viewer_names=VIEWER_NAMES, size=self.services.settings.web.thumbnail_size)
        return HTMLResponse(page, headers=PAGE_HEADERS)

    def thumbnail(self, request: Request) -> Response:
        """GET /thumbnails/{SOPInstanceUID}.jpg: the cached windowed JPEG of a stored image."""
        sop_uid = request.path_params["sop_uid"]
        try:
            relative = self.services.catalog.image_path(check_uid(sop_uid, "SOPInstanceUID"))
        except NodeError as error:
            return _error(request, 404, "Unknown image", str(error))
        if relative is None:
            return _error(request, 404, "Unknown image", f"no stored image {sop_uid}")
        try:
            path = self.renderer.thumbnail(relative, sop_uid, self.services.settings.web.thumbnail_size)
        except ModelError as error:
            LOG.warning("thumbnail of %s not rendered: %s", sop_uid, type(error).__name__)
            return _error(request, 422, "Image not renderable", f"the stored image {sop_uid} cannot be rendered")
        return FileResponse(path, media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"})


    def reference_sheet(self, request: Request) -> Response:
        """POST /api/studies/{uid}/reference-sheet: build the study's reference sheet, keep it and send it to
        the configured peer (``[reference_sheet]``); answers the sheet's UIDs and the peer's C-STORE status."""
        study_uid = request.path_params["study_uid"]
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # a cross-site HTML form cannot send this type without a CORS preflight, which the node never grants
            return JSONResponse({"error": "Unsupported media type", "detail": "send Content-Type: application/json"},
                                415)
        sheets = self.services.sheets
        try:
            if sheets is None:
                raise SheetsDisabledError()
            result = sheets.create(check_uid(study_uid, "StudyInstanceUID"))
        except NodeError as error:
            http = http_error(error)
            LOG.info("reference sheet request: %d %s", http.status, http.title)
            return _error(request, http.status, http.title, str(error))
        return JSONResponse(asdict(result), 201)


def routes(services: Services, renderer: Renderer) -> list[BaseRoute]:
    """Every route and mount of the node's web server."""
    pages = Pages(services, renderer)
    return [
        Route("/studies/{study_uid}/similar", pages.similar, methods=["GET"]),
        Route("/similar", pages.similar, methods=["GET"]),
        Route("/api/studies/{study_uid}/similar", pages.similar, methods=["GET"]),
        Route("/api/similar", pages.similar, methods=["GET"]),
        Route("/thumbnails/{sop_uid}.jpg", pages.thumbnail, methods=["GET"], name="thumbnail"),
        Route("/api/studies/{study_uid}/reference-sheet", pages.reference_sheet, methods=["POST"]),
        *dicomweb.routes(services, renderer),
    ]


class Authentication:
    """ASGI middleware: HTTP basic or bearer-token authentication, as configured; compared in constant time."""

    def __init__(self, app: ASGIApp, web: WebSettings) -> None:
        self.app = app
        self.web = web
        basic = web.auth == "basic"
        self.challenge = 'Basic realm="mmdl-node", charset="UTF-8"' if basic else 'Bearer realm="mmdl-node"'

    def accepts(self, authorization: str) -> bool:
        scheme, _, credentials = authorization.partition(" ")
        credentials = credentials.strip()
        if self.web.auth == "token":
            return scheme.lower() == "bearer" and secrets.compare_digest(credentials.encode(), self.web.token.encode())
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user_ok = secrets.compare_digest(user.encode(), self.web.username.encode())
        password_ok = secrets.compare_digest(password.encode(), self.web.password.encode())
        return user_ok and password_ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.accepts(Headers(scope=scope).get("authorization", "")):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse("authentication required\n", 401, headers={"WWW-Authenticate": self.challenge})
        await response(scope, receive, send)


class SafeHeaders:
    """ASGI middleware: every answer carries X-Content-Type-Options: nosniff, and is not cached unless its
    route says otherwise (answers carry patient data)."""

    DEFAULTS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(pair for pair in self.DEFAULTS if pair[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def create_app(services: Services, renderer: Renderer) -> ASGIApp:
    """The node's ASGI application, behind the configured authentication."""
    app: ASGIApp = Starlette(routes=routes(services, renderer))
    if services.settings.web.auth != "none":
        app = Authentication(app, services.settings.web)
    return SafeHeaders(app)
