"""The process-wide switches a node needs, set in one place and put back when the node stops.

- pynetdicom writes a received dataset to a file as its fragments arrive (never whole in memory), in
  ``tempfile.tempdir``, which is the node's incoming folder: PHI stays in the data dir, and keeping an
  instance is a rename;
- pynetdicom logs query and retrieve identifiers (patient data), and the node the C-FIND answers it sends itself
  (``handlers.send_answers``), only when ``logging.log_phi`` allows it; pynetdicom
  binds its standard handlers, which describe every message as it is sent or received, only when its log shows
  them (DEBUG with ``log_phi``): otherwise they build each description to throw it away, ~7 % of a
  similar-case query's CPU;
- OpenMP threads sleep when idle (``OMP_WAIT_POLICY=PASSIVE`` unless set): torch's otherwise spin beside
  the node's other threads, which halved the embedding rate and doubled freshness p99 (docs/BENCHMARKS.md).
  OpenMP reads it once, when torch is first imported, so it must be set before that;
- logging: no patient data from pynetdicom unless ``log_phi``; the configured level and a line format,
  unless the process has set up logging itself (``configure_logging``).

Several nodes may run in one process (tests): each ``configure_process`` is undone by its own
``ProcessSettings.restore``, in any order; the switches stay those of the latest node still running, and
are what the process had before the first one once none is.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from pynetdicom import _config as pynetdicom_config

from config.settings import LoggingSettings, Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOGGERS = ("", "apscheduler", "pynetdicom")  # the loggers whose levels are set ("" is the root)


@dataclass(frozen=True)
class _Switches:
    """The values of every switch, as set or as found; ``levels`` None: logging levels left as they were."""

    recv_chunked: bool
    log_identifiers: tuple[bool, bool]  # pynetdicom's LOG_REQUEST_IDENTIFIERS, LOG_RESPONSE_IDENTIFIERS
    log_handlers: str  # pynetdicom's LOG_HANDLER_LEVEL: "standard" or "none"
    tempdir: str | None
    omp_wait_policy: str | None
    levels: tuple[int, ...] | None  # of _LOGGERS

    @classmethod
    def current(cls, with_levels: bool) -> _Switches:
        return cls(pynetdicom_config.STORE_RECV_CHUNKED_DATASET,
                   (pynetdicom_config.LOG_REQUEST_IDENTIFIERS, pynetdicom_config.LOG_RESPONSE_IDENTIFIERS),
                   pynetdicom_config.LOG_HANDLER_LEVEL,
                   tempfile.tempdir, os.environ.get("OMP_WAIT_POLICY"),
                   tuple(logging.getLogger(name).level for name in _LOGGERS) if with_levels else None)

    def apply(self) -> None:
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = self.recv_chunked
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS, pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = self.log_identifiers
        pynetdicom_config.LOG_HANDLER_LEVEL = self.log_handlers
        tempfile.tempdir = self.tempdir
        if self.omp_wait_policy is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = self.omp_wait_policy
        for name, level in zip(_LOGGERS, self.levels or ()):
            logging.getLogger(name).setLevel(level)


class ProcessSettings:
    """The handle ``configure_process`` returns; ``restore`` undoes that call (once; later calls do nothing)."""

    def __init__(self, before: _Switches, added_handlers: list[logging.Handler]) -> None:
        self.before = before  # what this call found, to be put back
        self.added_handlers = added_handlers  # root handlers it added, to be removed

    def restore(self) -> None:
        with _LOCK:
            if self not in _ACTIVE:
                return
            position = _ACTIVE.index(self)
            _ACTIVE.remove(self)
            if position < len(_ACTIVE):  # a later call is still in force: it puts back what this one found
                later = _ACTIVE[position]
                later.before = self.before if self.before.levels is not None else replace(
                    self.before, levels=later.before.levels)
                later.added_handlers = self.added_handlers + later.added_handlers
                return
            self.before.apply()
            for handler in self.added_handlers:
                logging.getLogger().removeHandler(handler)


_LOCK = threading.Lock()
_ACTIVE: list[ProcessSettings] = []  # the calls not restored yet, oldest first


def configure_logging(settings: LoggingSettings) -> None:
    """pynetdicom's identifier logging and standard message handlers (its documented switches) off unless
    debugging with log_phi; then, unless the process has configured logging already (the root logger has a
    handler: pytest's, an application's that runs the node, or an earlier node's), the level and a line format."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = settings.log_phi
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = settings.log_phi
    debugging = settings.level == "DEBUG" and settings.log_phi
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if debugging else "none"
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=settings.level, format=LOG_FORMAT)
    # Coalesced runs of a busy job are expected; APScheduler's "skipped" notices are noise.
    logging.getLogger("apscheduler").setLevel("ERROR")
    # pynetdicom's own INFO/DEBUG lines describe every PDU and dataset; keep them for debugging sessions.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if debugging else "WARNING")


def configure_process(settings: Settings, incoming: Path) -> ProcessSettings:
    """Set every process-wide switch for a node whose received datasets go to ``incoming``; the handle
    returned puts back what was there before (see the module's description)."""
    with _LOCK:
        root = logging.getLogger()
        handlers = list(root.handlers)
        before = _Switches.current(with_levels=not handlers)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        configure_logging(settings.logging)
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(incoming)
        handle = ProcessSettings(before, [h for h in root.handlers if h not in handlers])
        _ACTIVE.append(handle)
        return handle
