"""Closing associations that do nothing useful: idle, or trickling bytes without ever finishing a message.

pynetdicom's network timeout restarts on every byte received, so a peer sending one byte every few
seconds would hold an association (and one of the limited slots) forever. The watchdog counts only
complete DIMSE messages, received or sent, and aborts an association that has none for too long.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

LOG = logging.getLogger(__name__)


class AssociationWatchdog:
    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._last: dict[Association, float] = {}
        self._lock = threading.Lock()
        self.aborted = 0

    def _touch(self, event: Event) -> None:
        with self._lock:
            self._last[event.assoc] = time.monotonic()

    def _forget(self, event: Event) -> None:
        with self._lock:
            self._last.pop(event.assoc, None)

    def handlers(self) -> list[tuple[Any, Any]]:
        """The pynetdicom event handlers to bind on the server."""
        return [
            (evt.EVT_ESTABLISHED, self._touch),
            (evt.EVT_DIMSE_RECV, self._touch),
            (evt.EVT_DIMSE_SENT, self._touch),
            (evt.EVT_RELEASED, self._forget),
            (evt.EVT_ABORTED, self._forget),
            (evt.EVT_CONN_CLOSE, self._forget),
        ]

    def sweep(self) -> int:
        """Abort every association without a complete message for ``limit_s``; returns how many."""
        now = time.monotonic()
        with self._lock:
            stale = [assoc for assoc, last in self._last.items() if now - last > self.limit_s]
            for assoc in stale:
                del self._last[assoc]
            self.aborted += len(stale)
        for assoc in stale:
            LOG.warning("aborting association from %s: no complete DIMSE message for %.0f s",
                        assoc.requestor.ae_title, self.limit_s)
            assoc.abort()
        return len(stale)
