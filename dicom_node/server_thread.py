"""A socketserver server served from a daemon thread of its own: the HL7 MLLP listener, the metrics HTTP port."""
from __future__ import annotations

import socketserver
import threading


class ServerThread:
    """``start`` serves ``server`` from a thread named ``name``; ``stop`` shuts it down and closes its socket."""

    def __init__(self, server: socketserver.BaseServer, name: str) -> None:
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)

    @property
    def host(self) -> str:
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
