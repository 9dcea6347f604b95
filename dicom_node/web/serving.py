"""The web server: uvicorn serving the node's ASGI app from a thread, started and stopped by the Node.

The listening socket is bound here, in the caller's thread, so that a port in use fails ``start`` with
an OSError rather than ending the server thread quietly. Access logs are off, and stay off whatever
handlers a log set-up attaches to uvicorn's access logger: request paths carry accession numbers.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading

import uvicorn
from starlette.types import ASGIApp

from config.settings import WebSettings, is_loopback

LOG = logging.getLogger(__name__)


def _no_access_lines(_: logging.LogRecord) -> bool:
    return False


class WebServer:
    """``start`` binds and serves in a thread until ``stop``."""

    def __init__(self, settings: WebSettings, app: ASGIApp) -> None:
        self.settings = settings
        tls = settings.tls
        self.config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=str(tls.certificate) if tls.enabled else None,
            ssl_keyfile=str(tls.private_key) if tls.enabled else None,
            ssl_ca_certs=str(tls.ca_certificates) if tls.enabled and tls.ca_certificates else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls.enabled and tls.ca_certificates else ssl.CERT_NONE,
        )
        access = logging.getLogger("uvicorn.access")
        if _no_access_lines not in access.filters:
            access.addFilter(_no_access_lines)
        self.server = uvicorn.Server(self.config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._socket is not None
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls.enabled else "http"
        return f"{scheme}://{self.settings.host}:{self.port}"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
        # protocol says TCP; without it every answer on a kept-alive connection waited ~40 ms for the client's
        # delayed ACK between its header and body writes.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        self._socket = sock
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="web-http",
                                        daemon=True)
        self._thread.start()
        if self.settings.auth == "none" and not is_loopback(self.settings.host):  # allow_unauthenticated is set
            LOG.warning("web server on %s without authentication: anyone who reaches it sees every study",
                        self.settings.host)
        LOG.info("web pages on %s/", self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
