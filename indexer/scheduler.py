"""APScheduler jobs of the node: embed pending items, snapshot the index. One instance each, coalesced."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

LOG = logging.getLogger(__name__)


class JobScheduler:
    """Runs named interval jobs in the background; failures are counted and logged, never lost."""

    def __init__(self) -> None:
        self._scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"max_instances": 1, "coalesce": True})
        self._scheduler.add_listener(self._on_event, EVENT_JOB_ERROR | EVENT_JOB_EXECUTED)
        self._lock = threading.Lock()
        self.runs: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    def _on_event(self, event: JobExecutionEvent) -> None:
        with self._lock:
            if event.exception is not None:
                self.failures[event.job_id] = self.failures.get(event.job_id, 0) + 1
                LOG.error("job %s failed: %s: %s", event.job_id, type(event.exception).__name__, event.exception)
            else:
                self.runs[event.job_id] = self.runs.get(event.job_id, 0) + 1

    def add(self, name: str, func: Callable[[], object], interval_s: float) -> None:
        self._scheduler.add_job(func, "interval", seconds=interval_s, id=name, name=name,
                                next_run_time=datetime.now(timezone.utc))

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
