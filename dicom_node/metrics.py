"""Operability: Prometheus metrics and a health endpoint on a small HTTP port.

Labels are AE titles, kinds and reason classes only: never patient names, IDs, accession numbers or report text.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from config.settings import MetricsSettings
from dicom_node.server_thread import ServerThread
from indexer.catalog import Catalog
from indexer.embedding import RoundStats

LOG = logging.getLogger(__name__)


class Metrics:
    """The node's counters and histograms, in a registry of its own (one per node)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.received = Counter("mmdl_received_instances", "Instances stored, by calling AE title",
                                ["calling_ae"], registry=self.registry)
        self.received_bytes = Counter("mmdl_received_bytes", "Bytes stored, by calling AE title",
                                      ["calling_ae"], registry=self.registry)
        self.failures = Counter("mmdl_failures", "Refused or failed work, by reason class", ["reason"],
                                registry=self.registry)
        self.embedded = Counter("mmdl_embedded", "Items embedded, by kind (image, report)", ["kind"],
                                registry=self.registry)
        self.hl7_messages = Counter("mmdl_hl7_messages", "HL7 messages answered, by MSA-1 code", ["ack"],
                                    registry=self.registry)
        self.query_seconds = Histogram("mmdl_query_seconds", "C-FIND duration, by kind (similar, catalog)",
                                       ["kind"], registry=self.registry,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def stored(self, calling_ae: str, size: int) -> None:
        self.received.labels(calling_ae).inc()
        self.received_bytes.labels(calling_ae).inc(size)

    def failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def embedding_round(self, stats: RoundStats) -> None:
        self.embedded.labels("image").inc(stats.images)
        self.embedded.labels("report").inc(stats.reports)
        for reason, count in stats.failures.items():
            self.failures.labels(f"embed_{reason}").inc(count)


class CatalogCollector(Collector):
    """Gauges read at scrape time: queue length, items by state, index size, held reports."""

    def __init__(self, catalog: Catalog, index_size: Callable[[], int]) -> None:
        self.catalog = catalog
        self.index_size = index_size

    def collect(self) -> Iterator[GaugeMetricFamily]:
        items = GaugeMetricFamily("mmdl_items", "Images and reports by embedding state", labels=["kind", "state"])
        pending = GaugeMetricFamily("mmdl_pending", "Queue length: items waiting to be embedded", labels=["kind"])
        queued = {"image": 0, "report_text": 0}
        for key, count in self.catalog.state_counts().items():
            kind, state = key.split(".", 1)
            items.add_metric([kind, state], count)
            if state == "pending":
                queued[kind] = queued.get(kind, 0) + count
        for kind, count in queued.items():
            pending.add_metric([kind], count)
        yield items
        yield pending
        yield GaugeMetricFamily("mmdl_index_size", "Studies in the similarity index", value=self.index_size())
        yield GaugeMetricFamily("mmdl_held_reports", "Reports waiting for their study",
                                value=self.catalog.held_report_count())


def health(dicom_up: Callable[[], bool], catalog: Catalog, index: str,
           receivers: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 when the DICOM server listens and the catalog answers, else 503.

    ``index`` (the similarity index: loading, ready, failed) and ``receivers`` (how many receiver processes take
    associations, "1/2 ready"; None without any) are reported beside and change no status: while the index loads
    the node stores, answers and retrieves as usual, and a missing receiver's share is served by the node, so a load
    balancer must keep sending to it."""
    checks = {"dicom": dicom_up(), "catalog": catalog.reachable()}
    ok = all(checks.values())
    body = {"status": "ok" if ok else "unavailable", **checks, "index": index}
    if receivers is not None:
        body["receivers"] = receivers
    return (200 if ok else 503), body


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHttpServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/health":
            code, body = self.server.health()
            self._reply(code, "application/json", json.dumps(body).encode())
        elif self.path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        else:
            self._reply(404, "text/plain", b"not found: /health or /metrics\n")

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        LOG.debug("metrics http: " + format, *args)


class _MetricsHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 health: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        self.registry = registry
        self.health = health
        super().__init__(address, _Handler)


class MetricsServer(ServerThread):
    """/health and /metrics on their own port, served from a thread."""

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry,
                 health: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        super().__init__(_MetricsHttpServer((settings.host, settings.port), registry, health), "metrics-http")

    def start(self) -> None:
        super().start()
        LOG.info("health and metrics on http://%s:%d/", self.host, self.port)
