"""pynetdicom event handlers: thin functions that get their dependencies as arguments (House style).

The node's errors are mapped to DICOM statuses here, in one place.
"""
from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from sqlalchemy.orm import Session

from config.settings import Settings
from dicom_node.errors import NodeError
from dicom_node.identifiers import instance_values, response, series_values, study_values
from dicom_node.ingest import Ingestor
from dicom_node.metrics import Metrics
from dicom_node.matching import iter_matches, matching_instances, query_level, study_summary
from dicom_node.similar import NotIndexedError, UnknownStudyError, sheet_requested, similar_responses
from dicom_node.sop_classes import UNCOMPRESSED
from dicom_node.status import REJECT_CALLED_AET, REJECT_CALLING_AET, REJECT_NO_RESOURCES, Status
from dicom_node.storage import FileStore
from indexer.catalog import AddOutcome, Catalog
from indexer.vector_index import VectorIndex

if TYPE_CHECKING:
    from dicom_node.reference_sheet import ReferenceSheets

LOG = logging.getLogger(__name__)
Answer = tuple[Any, Dataset | None]


@dataclass
class Services:
    """What the handlers need, handed to them when they are bound."""

    settings: Settings
    catalog: Catalog
    store: FileStore
    ingestor: Ingestor
    index: VectorIndex
    metrics: Metrics
    sheets: ReferenceSheets | None = None  # the reference-sheet option of similar-case queries


def status(code: Status, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = int(code)
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def called_ae(event: Event) -> str:
    return event.assoc.acceptor.ae_title.strip()


def calling_ae(event: Event) -> str:
    return event.assoc.requestor.ae_title.strip()


def handle_requested(event: Event, services: Services) -> None:
    """Association policy: answer for our AE titles only, and only to allowed callers."""
    request = event.assoc.requestor.primitive
    called = request.called_ae_title.strip()
    calling = request.calling_ae_title.strip()
    node = services.settings.node
    allowed = services.settings.access.allowed_calling_aets
    peer = services.settings.peer(calling)
    if called not in (node.ae_title, node.similar_ae_title):
        LOG.warning("association from %s rejected: called AE title %s is not served here", calling, called)
        _reject(event, REJECT_CALLED_AET)
    elif allowed and calling not in allowed:
        LOG.warning("association from %s rejected: calling AE title not allowed", calling)
        _reject(event, REJECT_CALLING_AET)
    elif peer is not None and peer.check_host and event.assoc.requestor.address not in host_addresses(peer.host):
        LOG.warning("association from %s rejected: it came from %s, not from its configured host", calling,
                    event.assoc.requestor.address)
        _reject(event, REJECT_CALLING_AET)
    elif not services.store.has_room():
        LOG.error("association from %s rejected: free disk space below the configured watermark", calling)
        _reject(event, REJECT_NO_RESOURCES)
    else:
        event.assoc.acceptor.ae_title = called


@functools.lru_cache(maxsize=256)
def _resolve(host: str) -> frozenset[str]:
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()


def host_addresses(host: str) -> frozenset[str]:
    """The IP addresses ``host`` names (cached; a literal address names itself)."""
    return _resolve(host) | {host}


def _reject(event: Event, reason: tuple[int, int, int]) -> None:
    """A-ASSOCIATE-RJ, then stop the association the way pynetdicom's own rejections do (kill flushes the PDU)."""
    event.assoc.acse.send_reject(*reason)
    event.assoc.kill()


def handle_connection_open(event: Event) -> None:
    """Send each PDU at once (TCP_NODELAY). pynetdicom writes a DIMSE message as several PDUs; with
    Nagle's algorithm on, a PDU written while the previous one is unacknowledged waits for the peer's
    delayed ACK (~40 ms on Linux), once per message."""
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NO_DELAY = [(evt.EVT_CONN_OPEN, handle_connection_open)]


def handle_echo(event: Event) -> int:
    return Status.SUCCESS


def handle_store(event: Event, services: Services) -> Dataset:
    """Keep the dataset exactly as received, catalog it, and only then answer success; pynetdicom deletes
    the received file afterwards unless it was kept."""
    received = event.dataset_path  # pynetdicom wrote it there as it arrived (chunked receive)
    try:
        ds = dcmread(received)
        ds.walk(lambda *_: None)  # decode every element now, so that a malformed one is refused here
    except Exception as error:  # a malformed encoding can raise many error types inside pydicom
        LOG.warning("C-STORE from %s: dataset cannot be parsed (%s)", calling_ae(event), type(error).__name__)
        return status(Status.CANNOT_UNDERSTAND, "dataset cannot be parsed")
    result = services.ingestor.ingest(
        ds,
        received,
        sop_class_uid=event.context.abstract_syntax,
        transfer_syntax=event.context.transfer_syntax,
        calling_ae=calling_ae(event),
    )
    if result.status is not Status.SUCCESS:
        LOG.warning("C-STORE from %s refused with 0x%04X: %s", calling_ae(event), result.status, result.comment)
        services.metrics.failed(f"store_{result.status.name.lower()}")
    elif result.outcome is AddOutcome.STORED:
        services.metrics.stored(calling_ae(event), result.size)
    return status(result.status, result.comment)


def handle_find(event: Event, services: Services) -> Iterator[Answer]:
    """Study Root C-FIND: catalog matching on the node's AE title, similar cases on the similar AE title."""
    similar = called_ae(event) == services.settings.node.similar_ae_title
    start = time.monotonic()
    try:
        yield from (_find_similar(event, services) if similar else _find_catalog(event, services))
    finally:
        services.metrics.query_seconds.labels("similar" if similar else "catalog").observe(time.monotonic() - start)


def _find_similar(event: Event, services: Services) -> Iterator[Answer]:
    retrieve_ae = services.settings.node.similar_ae_title
    try:
        wants_sheet = sheet_requested(event.identifier)
        answers = similar_responses(services.catalog, services.index, event.identifier,
                                    services.settings.query, retrieve_ae)
    except NodeError as error:
        code = (Status.UNKNOWN_STUDY if isinstance(error, UnknownStudyError)
                else Status.STUDY_NOT_INDEXED if isinstance(error, NotIndexedError)
                else Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        services.metrics.failed(f"similar_{code.name.lower()}")
        yield status(code, str(error)), None
        return
    LOG.info("similar-case query from %s: %d answers", calling_ae(event), len(answers))
    if wants_sheet and answers and services.sheets is not None:
        services.sheets.request(event.identifier)
    for answer in answers:
        if event.is_cancelled:
            yield Status.CANCEL, None
            return
        yield Status.PENDING, answer


def _pages(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(rows)
    while page := list(islice(iterator, size)):
        yield page


def _values(session: Session, level: str, page: list[Any]) -> Iterator[dict[str, Any]]:
    if level == "STUDY":
        summaries = study_summary(session, [row.id for row in page])
        return (study_values(row, summaries.get(row.id)) for row in page)
    if level == "SERIES":
        return (series_values(row) for row in page)
    return (instance_values(row) for row in page)


def _find_catalog(event: Event, services: Services) -> Iterator[Answer]:
    request = event.identifier
    try:
        level = query_level(request)
    except NodeError as error:
        yield status(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(error)), None
        return
    count = 0
    retrieve_ae = called_ae(event)
    with services.catalog.session() as session:
        for page in _pages(iter_matches(session, request, level), 100):
            for values in _values(session, level, page):
                if event.is_cancelled:
                    yield Status.CANCEL, None
                    return
                yield Status.PENDING, response(request, level, values, retrieve_ae)
            count += len(page)
    LOG.info("C-FIND from %s at %s level: %d matches", calling_ae(event), level, count)


def _instances(services: Services, identifier: Dataset) -> list[tuple[str, str, str]]:
    with services.catalog.session() as session:
        return matching_instances(session, identifier)


def _send(event: Event, services: Services, instances: list[tuple[str, str, str]]) -> Iterator[Answer]:
    """One pending answer per stored instance, read from disk as it goes."""
    for path, _, _ in instances:
        if event.is_cancelled:
            yield Status.CANCEL, None
            return
        yield Status.PENDING, dcmread(services.store.absolute(path))


def store_contexts(instances: list[tuple[str, str, str]]) -> list[PresentationContext]:
    """Presentation contexts for sending these instances: their own transfer syntax, or any uncompressed one."""
    syntaxes: dict[str, set[str]] = {}
    for _, sop_class, transfer_syntax in instances:
        wanted = set(UNCOMPRESSED) if transfer_syntax in UNCOMPRESSED else {transfer_syntax}
        syntaxes.setdefault(sop_class, set()).update(wanted)
    return [build_context(sop_class, sorted(ts)) for sop_class, ts in sorted(syntaxes.items())][:128]


def handle_move(event: Event, services: Services) -> Iterator[Any]:
    """C-MOVE to a configured peer only; every stored instance under the match is sent."""
    peer = services.settings.peer(event.move_destination)
    if peer is None:
        LOG.warning("C-MOVE from %s to unknown destination refused", calling_ae(event))
        yield None, None
        return
    try:
        instances = _instances(services, event.identifier)
    except NodeError as error:
        yield peer.host, peer.port
        yield 1
        yield status(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(error)), None
        return
    LOG.info("C-MOVE from %s to %s: %d instances", calling_ae(event), peer.ae_title, len(instances))
    yield peer.host, peer.port, {"contexts": store_contexts(instances), "evt_handlers": NO_DELAY}
    yield len(instances)
    yield from _send(event, services, instances)


def handle_get(event: Event, services: Services) -> Iterator[Any]:
    """C-GET: the stored instances under the match, sent back on the same association."""
    try:
        instances = _instances(services, event.identifier)
    except NodeError as error:
        yield 1
        yield status(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(error)), None
        return
    LOG.info("C-GET from %s: %d instances", calling_ae(event), len(instances))
    yield len(instances)
    yield from _send(event, services, instances)
