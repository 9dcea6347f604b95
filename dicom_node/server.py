"""The node: the DICOM application entity, the catalog, the file store, the index and the embedding job."""
from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pynetdicom import evt

from config.settings import Settings, TlsSettings
from dicom_node.acceptor import build_ae, storage_handlers
from dicom_node.handlers import Services, handle_find, handle_get, handle_move
from dicom_node.hl7 import Hl7Listener
from dicom_node.ingest import Ingestor
from dicom_node.metrics import CatalogCollector, Metrics, MetricsServer, health
from dicom_node.process import configure_process
from dicom_node.receivers import Receivers
from dicom_node.retrieve import HeldSyntaxes
from dicom_node.reference_sheet import ReferenceSheets
from dicom_node.storage import FileStore
from dicom_node.upper_layer import WaitingServer
from dicom_node.watchdog import AssociationWatchdog
from dicom_node.web.app import create_app
from dicom_node.web.render import Renderer
from dicom_node.web.serving import WebServer
from indexer.catalog import Catalog
from indexer.embedding import EmbeddingJob, Encoder
from indexer.scheduler import JobScheduler
from indexer.vector_index import HnswParams, VectorIndex
from models.bundle_manifest import DEFAULT_MODEL_DIR, embedding_dim
from models.calibration import load_calibration

LOG = logging.getLogger(__name__)


def model_directory(settings: Settings) -> Path:
    """The MMDL model directory the settings name (the shipped one by default)."""
    return settings.model.path or DEFAULT_MODEL_DIR


def load_configured_model(settings: Settings) -> Encoder:
    """The MMDL model the settings name."""
    from models.bundle import MMDLModel

    return MMDLModel.load(model_directory(settings), device=settings.model.device)


def decode_stored_image(path: Path) -> np.ndarray:
    from models.imaging import read_dicom_image

    return read_dicom_image(path)


def tls_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """Server-side TLS 1.2+ with the node's certificate; client certificates required when a CA is set."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(str(tls.ca_certificates))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Node:
    """Owns every part of a running node; ``start`` serves, ``stop`` shuts down cleanly.

    Made, it sets the process-wide switches it needs (``dicom_node.process``), before it logs anything or
    loads torch; ``stop`` puts them back.
    """

    def __init__(self, settings: Settings, load_model: Callable[[], Encoder] | None = None) -> None:
        self.settings = settings
        data_dir = settings.node.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = FileStore(data_dir / "storage", min_free_bytes=settings.node.min_free_disk_mb * 2**20)
        self._process = configure_process(settings, self.store.incoming)
        try:
            self._open(load_model)
        except BaseException:
            self._process.restore()
            raise

    def _open(self, load_model: Callable[[], Encoder] | None) -> None:
        settings = self.settings
        data_dir = settings.node.data_dir
        removed = self.store.remove_temporaries()
        if removed:
            LOG.warning("removed %d partial files left by an interrupted receive", removed)
        self.catalog = Catalog(settings.catalog_url)
        self.renderer = Renderer(self.store, data_dir / "thumbnails")  # pictures of stored images, for people
        params = HnswParams.from_settings(embedding_dim(model_directory(settings)), settings.index)
        # loaded (or rebuilt, caught up) in the background: the ports open meanwhile (dicom_node.similar
        # refuses similar-case queries, the jobs skip their rounds, until it is ready)
        self.index = VectorIndex.open_in_background(params, data_dir / "index", self.catalog)
        self.metrics = Metrics()
        self.metrics.registry.register(CatalogCollector(self.catalog, lambda: len(self.index)))
        calibration = load_calibration(model_directory(settings))
        if calibration is None:
            LOG.warning("model in %s has no calibration (mmdl-node calibrate): answers show no findings",
                        model_directory(settings))
        held = HeldSyntaxes(self.catalog.held_syntaxes())
        ingestor = Ingestor(self.store, self.catalog, held, data_dir / "locks")
        self.sheets = ReferenceSheets(settings, self.catalog, self.index, self.store, ingestor, self.renderer,
                                      calibration)
        self.services = Services(settings, self.catalog, self.store, ingestor, self.index, self.metrics,
                                 held, calibration, self.sheets, self.associations)
        self.job = EmbeddingJob(
            self.catalog,
            self.index,
            self.store.root,
            load_model=load_model or (lambda: load_configured_model(settings)),
            decode=decode_stored_image,
            batch_size=settings.scheduler.batch_size,
            decode_workers=settings.scheduler.decode_workers,
        )
        self.scheduler = JobScheduler()
        self.watchdog = AssociationWatchdog(settings.node.message_timeout_s)
        self.ae = build_ae(settings)
        self._server: WaitingServer | None = None
        self.receivers: Receivers | None = None
        self.hl7: Hl7Listener | None = None
        self.http: MetricsServer | None = None
        self.web: WebServer | None = None
        self._stop_lock = threading.Lock()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve every configured door; a door that cannot start (a port in use) stops the others and raises."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        services = self.services
        handlers = [
            *storage_handlers(services, self.watchdog),
            (evt.EVT_C_FIND, handle_find, [services]),
            (evt.EVT_C_MOVE, handle_move, [services]),
            (evt.EVT_C_GET, handle_get, [services]),
        ]
        node = self.settings.node
        self._server = self.ae.start_server((node.host, node.port), block=False, evt_handlers=handlers,
                                            ssl_context=tls_context(self.settings.tls))
        if node.receivers:
            self.receivers = Receivers(self.settings, self.metrics, services.held, self.associations)
            self.receivers.start()
            self._server.hand_off = self.receivers.hand_off
        if self.settings.hl7.enabled:
            self.hl7 = Hl7Listener(self.settings.hl7, self.catalog, node.network_timeout_s, self._count_hl7,
                                   tls_context(self.settings.hl7.tls))
            self.hl7.start()
        if self.settings.metrics.enabled:
            self.http = MetricsServer(self.settings.metrics, self.metrics.registry, lambda: health(
                self.dicom_up, self.catalog, self.index.state, self._receivers_ready()))
            self.http.start()
        if self.settings.web.enabled:
            self.web = WebServer(self.settings.web,
                                 create_app(self.services, self.renderer))
            self.web.start()
        self.scheduler.add("embed", self.embed, self.settings.scheduler.interval_s)
        self.scheduler.add("snapshot", self.snapshot, self.settings.index.snapshot_interval_s)
        self.scheduler.add("housekeeping", self.housekeeping, min(5.0, node.message_timeout_s / 4))
        if self.settings.reference_sheet.for_every_new_study:
            self.scheduler.add("reference_sheets", self.sheets.create_for_new_studies, 5.0)
        self.scheduler.start()
        LOG.info("node %s / %s listening on %s:%d, similarity index %s", node.ae_title, node.similar_ae_title,
                 node.host, self.port, self.index.state)

    def associations(self) -> int:
        """The node's acceptor associations, those its receiver processes serve included (its limit's count)."""
        receivers = self.receivers  # stop() may set it to None meanwhile
        here = sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)
        return here + (receivers.serving() if receivers is not None else 0)

    def _receivers_ready(self) -> str | None:
        """How many receiver processes take associations ("1/2 ready"); None when the node has none."""
        receivers = self.receivers  # stop() may set it to None meanwhile
        if receivers is None:
            return None
        return f"{len(receivers.ready())}/{self.settings.node.receivers} ready"

    def dicom_up(self) -> bool:
        """Whether the DICOM server is running and its socket open."""
        server = self._server
        return server is not None and server.socket.fileno() != -1

    def housekeeping(self) -> None:
        """Abort stalled associations; delete what aborted transfers left in the incoming folder."""
        self.watchdog.sweep()
        removed = self.store.remove_temporaries(older_than_s=2 * self.settings.node.message_timeout_s)
        if removed:
            LOG.warning("removed %d files left by aborted transfers", removed)

    def embed(self) -> None:
        """One embedding round, counted in the metrics."""
        self.metrics.embedding_round(self.job.run())

    def _count_hl7(self, code: str) -> None:
        self.metrics.hl7_messages.labels(code).inc()
        if code != "AA":
            self.metrics.failed(f"hl7_{code.lower()}")

    def snapshot(self) -> None:
        """Snapshot the index when it changed since the last one; never while it loads."""
        if self.index.ready and self.index.seq != self.index.saved_seq:
            self.index.snapshot()

    def stop(self) -> None:
        with self._stop_lock:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
            if self.receivers is not None:
                self.receivers.stop()
                self.receivers = None
            for listener in (self.hl7, self.http, self.web):
                if listener is not None:
                    listener.stop()
            self.hl7 = self.http = self.web = None
            self.scheduler.shutdown()
            self.sheets.close()
            self.job.close()
            self.snapshot()
            self.catalog.close()
            LOG.info("node stopped")
            self._process.restore()
