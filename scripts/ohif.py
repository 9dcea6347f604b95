#!/usr/bin/env python3
"""Serve the OHIF viewer (npm ``@ohif/app``, its prebuilt ``dist/``) offline against the node's DICOMweb.

    scripts/ohif.py fetch                                   # once: npm pack into .cache/ohif/<version>
    scripts/ohif.py serve --node http://127.0.0.1:8080      # http://127.0.0.1:3000/viewer?StudyInstanceUIDs=...

The viewer and the node's DICOMweb roots share one origin: this server answers OHIF's files itself
(any other path falls back to ``index.html``, OHIF being a single-page app) and forwards ``/dicomweb``
and ``/dicomweb-similar`` to the node, so the browser needs no CORS and the node's authentication
(an ``Authorization`` header) passes through unchanged. ``/app-config.js`` is written here: one data
source, the archive root. Similar cases reach OHIF as a pair of studies in the viewer URL; OHIF's study list
(3.13) filters by patient, date, modality and description only, so it cannot name the query study that the
``/dicomweb-similar`` search needs. Only the Python standard library is used.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OHIF_VERSION = "3.13.2"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "ohif"
PROXIED = ("/dicomweb/", "/dicomweb-similar/")
FORWARDED_HEADERS = ("Accept", "Authorization", "Range", "If-None-Match", "If-Modified-Since")
CHUNK = 1 << 16


def dist_dir(version: str = OHIF_VERSION, cache: Path = CACHE) -> Path:
    return cache / version / "package" / "dist"


def fetch(version: str = OHIF_VERSION, cache: Path = CACHE) -> Path:
    """The cached OHIF ``dist/`` folder, fetched with ``npm pack`` from the npm registry the first time."""
    dist = dist_dir(version, cache)
    if (dist / "index.html").is_file():
        return dist
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["npm", "pack", f"@ohif/app@{version}", "--pack-destination", work, "--silent"],
                       check=True, stdout=subprocess.DEVNULL)
        [tarball] = Path(work).glob("*.tgz")
        staging = Path(work) / "unpacked"
        with tarfile.open(tarball) as archive:
            archive.extractall(staging, filter="data")
        target = cache / version
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(staging, target)  # whole or not at all: a half-unpacked folder is never taken for done
    return dist


def app_config() -> str:
    """OHIF's ``app-config.js``: the node's archive root on this origin as the one DICOMweb data source
    (QIDO search, WADO-RS series metadata, frames as stored, the node's thumbnails)."""
    archive = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "mmdl",
        "configuration": {
            "friendlyName": "mmdl-node",
            "name": "mmdl",
            "qidoRoot": "/dicomweb",
            "wadoRoot": "/dicomweb",
            "wadoUriRoot": "/dicomweb",
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "thumbnail",  # the node's cached, windowed JPEG
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "defaultDataSourceName": "mmdl",
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [archive],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


class Handler(SimpleHTTPRequestHandler):
    """OHIF's files, the generated config, and the DICOMweb roots forwarded to the node."""

    node = ""  # set by serve(): the node's web base URL, e.g. http://127.0.0.1:8080
    config = b""

    def end_headers(self) -> None:
        # cross-origin isolation, so that OHIF may use SharedArrayBuffer (every resource is same-origin)
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        path = self.path.split("?", 1)[0]
        if path.startswith(PROXIED):
            self._forward()
        elif path == "/app-config.js":
            self._send(HTTPStatus.OK, "text/javascript", self.config)
        else:
            if not (Path(self.directory) / path.lstrip("/")).is_file():
                self.path = "/index.html"  # a viewer route: the single-page app decides
            super().do_GET()

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self) -> None:
        """The node's answer, streamed; the browser's Host is kept so that the node's absolute URLs
        (RetrieveURL, BulkDataURI) point at this origin."""
        headers = {name: self.headers[name] for name in ("Host", *FORWARDED_HEADERS) if self.headers[name]}
        request = urllib.request.Request(self.node + self.path, headers=headers)
        try:
            upstream = urllib.request.urlopen(request, timeout=120)
        except urllib.error.HTTPError as error:
            upstream = error
        except OSError as error:
            self._send(HTTPStatus.BAD_GATEWAY, "text/plain", f"node unreachable: {error}".encode())
            return
        with upstream:
            self.send_response(upstream.status)
            for name in ("Content-Type", "Content-Length", "Warning", "Retry-After", "WWW-Authenticate"):
                if upstream.headers.get(name):
                    self.send_header(name, upstream.headers[name])
            self.end_headers()  # HTTP/1.0: the connection closes after the body, so no length is needed
            while chunk := upstream.read(CHUNK):
                self.wfile.write(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
        pass  # request lines carry UIDs in paths and patient keys in queries: not logged


def serve(node: str, host: str, port: int, dist: Path) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for OHIF in ``dist`` against the node at ``node``."""
    handler = type("OhifHandler", (Handler,), {"node": node.rstrip("/"), "config": app_config().encode()})
    server = ThreadingHTTPServer((host, port), lambda *a: handler(*a, directory=str(dist)))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=OHIF_VERSION, help="the @ohif/app version (default %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="fetch OHIF from the npm registry into the cache (once)")
    run = commands.add_parser("serve", help="serve OHIF, forwarding DICOMweb to the node")
    run.add_argument("--node", default="http://127.0.0.1:8080", help="the node's web base URL")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch(args.version))
        return 0
    dist = dist_dir(args.version)
    if not (dist / "index.html").is_file():
        print(f"OHIF {args.version} is not fetched yet: run {sys.argv[0]} fetch", file=sys.stderr)
        return 2
    server = serve(args.node, args.host, args.port, dist)
    print(f"OHIF on http://{args.host}:{server.server_address[1]}/ (DICOMweb from {args.node})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
