"""Logging for the node: UIDs and counts, never patient names, IDs or report text unless the admin allows it."""
from __future__ import annotations

import logging

from pynetdicom import _config as pynetdicom_config

from config.settings import LoggingSettings


def configure_logging(settings: LoggingSettings) -> None:
    """Set levels and turn off pynetdicom's identifier logging (its documented switches) unless log_phi."""
    logging.basicConfig(
        level=settings.level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().setLevel(settings.level)
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = settings.log_phi
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = settings.log_phi
    # Coalesced runs of a busy job are expected; APScheduler's "skipped" notices are noise.
    logging.getLogger("apscheduler").setLevel("ERROR")
    # pynetdicom's own INFO/DEBUG lines describe every PDU and dataset; keep them for debugging sessions.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if settings.level == "DEBUG" and settings.log_phi else "WARNING")
