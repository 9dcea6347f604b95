"""Backfill: have the PACS send the node the studies it already holds, gently, resumably.

Two sources, one contract (``Source``): Orthanc over its REST API (pyorthanc: /tools/find, then
/modalities/{node}/store), or any PACS over DIMSE (C-FIND at STUDY level, then C-MOVE to the node).
A study is skipped when the node's catalog already holds as many of its instances as the PACS lists,
so a stopped run resumes where it was and a second run sends nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import pyorthanc
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove

from config.settings import BackfillSettings, Peer
from indexer.catalog import Catalog
from indexer.errors import IndexerError

LOG = logging.getLogger(__name__)


class BackfillError(IndexerError):
    """The PACS did not list or did not send a study."""


@dataclass(frozen=True)
class Filters:
    """Study date range (YYYYMMDD, either end open) and modalities (any of them in the study)."""

    date_from: str = ""
    date_to: str = ""
    modalities: tuple[str, ...] = ()

    @property
    def date_range(self) -> str:
        return f"{self.date_from}-{self.date_to}" if self.date_from or self.date_to else ""


@dataclass(frozen=True)
class StudyRef:
    study_uid: str
    instances: int  # as the PACS counts them; 0 when it does not say
    key: str  # how the source names it (Orthanc ID, or the study UID)


class Source(Protocol):
    def studies(self, filters: Filters) -> Iterator[StudyRef]: ...
    def send(self, study: StudyRef) -> None: ...


class OrthancSource:
    """Orthanc's REST API through pyorthanc; Orthanc sends with its own C-STORE to the node's modality entry."""

    def __init__(self, settings: BackfillSettings) -> None:
        self.client = pyorthanc.Orthanc(settings.orthanc_url, username=settings.orthanc_username or None,
                                        password=settings.orthanc_password or None, timeout=600)
        self.modality = settings.orthanc_node_modality

    def studies(self, filters: Filters) -> Iterator[StudyRef]:
        query: dict[str, str] = {}
        if filters.date_range:
            query["StudyDate"] = filters.date_range
        if filters.modalities:
            query["ModalitiesInStudy"] = "\\".join(filters.modalities)
        for study in self.client.post_tools_find(json={"Level": "Study", "Query": query, "Expand": True}):
            count = self.client.get_studies_id_statistics(study["ID"])["CountInstances"]
            yield StudyRef(study["MainDicomTags"]["StudyInstanceUID"], int(count), study["ID"])

    def send(self, study: StudyRef) -> None:
        job = self.client.post_modalities_id_store(self.modality, json={"Resources": [study.key], "Synchronous": True})
        if int(job.get("FailedInstancesCount", 0)):
            raise BackfillError(f"Orthanc could not send {job['FailedInstancesCount']} instances of {study.study_uid}")


class DimseSource:
    """Any PACS: C-FIND at STUDY level, then C-MOVE each study to the node's AE title."""

    def __init__(self, pacs: Peer, node_ae_title: str) -> None:
        self.pacs = pacs
        self.node_ae_title = node_ae_title

    def _associate(self, context: str) -> object:
        ae = AE(ae_title=self.node_ae_title)
        ae.add_requested_context(context)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title)
        if not assoc.is_established:
            raise BackfillError(f"association with {self.pacs.ae_title} at {self.pacs.host}:{self.pacs.port} failed")
        return assoc

    def studies(self, filters: Filters) -> Iterator[StudyRef]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyDate = filters.date_range
        query.ModalitiesInStudy = "\\".join(filters.modalities)
        query.NumberOfStudyRelatedInstances = ""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
        try:
            found = []
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if not status or status.Status not in (0x0000, 0xFF00, 0xFF01):
                    raise BackfillError(f"C-FIND failed with status {getattr(status, 'Status', 'none')}")
                if identifier is not None and identifier.get("StudyInstanceUID"):
                    count = int(identifier.get("NumberOfStudyRelatedInstances") or 0)
                    found.append(StudyRef(str(identifier.StudyInstanceUID), count, str(identifier.StudyInstanceUID)))
        finally:
            assoc.release()
        yield from found

    def send(self, study: StudyRef) -> None:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study.study_uid
        assoc = self._associate(StudyRootQueryRetrieveInformationModelMove)
        try:
            final = None
            for status, _ in assoc.send_c_move(identifier, self.node_ae_title, StudyRootQueryRetrieveInformationModelMove):
                final = status
        finally:
            assoc.release()
        if not final or final.Status != 0x0000:
            raise BackfillError(f"C-MOVE of {study.study_uid} ended with status {getattr(final, 'Status', 'none')}")


def make_source(settings: BackfillSettings, node_ae_title: str) -> Source:
    if settings.source == "dimse":
        assert settings.pacs is not None  # checked by the settings
        return DimseSource(settings.pacs, node_ae_title)
    return OrthancSource(settings)


class RateLimit:
    """At most ``per_s`` starts a second; waits end early when ``stop`` is set."""

    def __init__(self, per_s: float, stop: threading.Event) -> None:
        self.interval = 1.0 / per_s
        self.stop = stop
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            now = time.monotonic()
            start, self._next = max(now, self._next), max(now, self._next) + self.interval
        return not self.stop.wait(max(0.0, start - now))


@dataclass
class Progress:
    listed: int = 0
    sent: int = 0
    held: int = 0  # already in the catalog: not sent again
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.sent + self.held + self.failed

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.sent / elapsed if elapsed > 0 else 0.0
        todo = self.listed - self.done
        eta = f"{todo / rate:.0f} s" if rate > 0 else "-"
        return (f"backfill: {self.done}/{self.listed} studies ({self.sent} sent, {self.held} already held, "
                f"{self.failed} failed), {rate:.2f} studies/s, ETA {eta}")


def run_backfill(source: Source, catalog: Catalog, filters: Filters, settings: BackfillSettings,
                 report: Callable[[Progress], None], stop: threading.Event | None = None) -> Progress:
    """Send every listed study the catalog does not hold yet, within the rate and concurrency limits."""
    stop = stop or threading.Event()
    progress = Progress()
    studies = list(source.studies(filters))
    progress.listed = len(studies)
    limit = RateLimit(settings.studies_per_s, stop)
    lock = threading.Lock()

    def one(study: StudyRef) -> None:
        if catalog.study_instance_count(study.study_uid) >= max(study.instances, 1):
            outcome = "held"
        elif not limit.acquire():
            return
        else:
            try:
                source.send(study)
                outcome = "sent"
            except Exception as error:  # one study failing does not stop the crawl; it is retried next run
                LOG.warning("backfill of study %s failed: %s", study.study_uid, error)
                outcome = "failed"
        with lock:
            setattr(progress, outcome, getattr(progress, outcome) + 1)
            report(progress)

    submitted: list[Future[None]] = []
    with ThreadPoolExecutor(settings.concurrency, thread_name_prefix="backfill") as pool:
        running: set[Future[None]] = set()
        for study in studies:
            if stop.is_set():
                break
            if len(running) >= settings.concurrency:
                _, running = wait(running, return_when=FIRST_COMPLETED)
            future = pool.submit(one, study)
            running.add(future)
            submitted.append(future)
    for future in submitted:
        future.result()  # a catalog error is not a study's failure: let it surface
    return progress
