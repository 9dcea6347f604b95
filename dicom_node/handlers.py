"""pynetdicom event handlers: thin functions that get their dependencies as arguments (House style).

A query or retrieve the node refuses is answered with the status its error carries (``NodeError.status``); a
C-STORE with the status the Ingestor gives, CANNOT_UNDERSTAND when the dataset cannot be read. Any other exception
is pynetdicom's to answer.
"""
from __future__ import annotations

import functools
import logging
import socket
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import pretty_dataset
from pynetdicom.events import Event
from pynetdicom.presentation import build_context

from config.settings import Settings
from dicom_node.errors import NodeError
from dicom_node.identifiers import encode_identifier, response
from dicom_node.ingest import IngestResult, Ingestor, read_received
from dicom_node.metrics import Metrics
from dicom_node.matching import matching_keys, query_level
from dicom_node.retrieve import (
    HeldSyntaxes,
    Receiver,
    Stored,
    offered_contexts,
    prefer_stored_syntax,
    retrieve_keys,
    send,
)
from dicom_node.similar import sheet_requested, similar_responses
from dicom_node.sop_classes import VERIFICATION
from dicom_node.status import REJECT_CALLED_AET, REJECT_CALLING_AET, REJECT_NO_RESOURCES, Status
from dicom_node.storage import FileStore
from indexer.catalog import AddOutcome, Catalog
from indexer.vector_index import VectorIndex
from models.calibration import Calibration

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
    held: HeldSyntaxes
    calibration: Calibration | None = None  # of the node's model: calibrated findings and match probability
    sheets: ReferenceSheets | None = None  # the reference-sheet option of similar-case queries
    # The node's acceptor associations, its receiver processes' included (None in a receiver: the node hands it
    # none beyond the limit, and pynetdicom counts its own).
    associations: Callable[[], int] | None = None


def status(code: Status, comment: str = "") -> Dataset | int:
    """What a handler answers: the bare code (pynetdicom takes an int), or with a comment a status dataset."""
    if not comment:
        return int(code)
    ds = Dataset()
    ds.Status = int(code)
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
    elif services.associations is not None and services.associations() > node.max_associations:
        LOG.warning("association from %s rejected: node.max_associations (%d) reached, receivers included", calling,
                    node.max_associations)
        _reject(event, REJECT_NO_RESOURCES)
    elif not services.store.has_room():
        LOG.error("association from %s rejected: free disk space below the configured watermark", calling)
        _reject(event, REJECT_NO_RESOURCES)
    else:
        event.assoc.acceptor.ae_title = called
        prefer_stored_syntax(event.assoc, services.held)


REJECTION_REASONS = {0x01: "user rejection", 0x02: "no reason", 0x03: "abstract syntax not supported",
                     0x04: "transfer syntaxes not supported"}


def handle_accepted(event: Event) -> None:
    """Log the presentation contexts the node rejected, one line per association: AE titles, SOP classes and
    reasons, no patient data. Routine (INFO) while some context was accepted: peers such as storescu propose
    every class they know; a WARNING when nothing was, since then the peer can do nothing here."""
    rejected: dict[str, set[str]] = {}
    for context in event.assoc.rejected_contexts:
        reason = REJECTION_REASONS.get(context.result, f"result {context.result}")
        rejected.setdefault(reason, set()).add(context.abstract_syntax.name)
    if rejected:
        LOG.log(logging.INFO if event.assoc.accepted_contexts else logging.WARNING,
                "association %s -> %s: %d presentation contexts rejected: %s", calling_ae(event), called_ae(event),
                len(event.assoc.rejected_contexts),
                "; ".join(f"{reason}: {', '.join(sorted(names))}" for reason, names in rejected.items()))


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


_ABORTING: weakref.WeakSet[Any] = weakref.WeakSet()
_ACCEPTED: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _accepted_ids(assoc: Any) -> frozenset[int]:
    """The IDs of the presentation contexts accepted on ``assoc``, read once per association: they are fixed
    before any P-DATA-TF arrives, and a large dataset arrives as tens of them."""
    ids = _ACCEPTED.get(assoc)
    if ids is None:
        ids = _ACCEPTED[assoc] = frozenset(context.context_id for context in assoc.accepted_contexts)
    return ids


def handle_pdu_received(event: Event) -> None:
    """A P-DATA-TF on a presentation context the node did not accept (e.g. a CT image sent on the
    rejected CT context): logged, dropped before pynetdicom decodes it (its chunked receive would fail
    with a traceback and leave the association to the watchdog), and the association aborted at once."""
    items = getattr(event.pdu, "presentation_data_value_items", None)
    if not items:
        return
    refused = sorted({item.presentation_context_id for item in items} - _accepted_ids(event.assoc))
    if refused:
        items.clear()
        if event.assoc not in _ABORTING:  # later PDUs may arrive before the abort goes out
            _ABORTING.add(event.assoc)
            LOG.warning("association %s -> %s aborted: data sent on presentation context %s, which was not "
                        "accepted", calling_ae(event), called_ae(event), ", ".join(map(str, refused)))
            event.assoc.abort(block=False)


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


def handle_store(event: Event, services: Services) -> Dataset | int:
    """Keep the dataset exactly as received, catalog it, and only then answer success; pynetdicom deletes
    the received file afterwards unless it was kept."""
    received = event.dataset_path  # pynetdicom wrote it there as it arrived (chunked receive)
    try:
        ds = read_received(received)
    except NodeError as error:
        result = IngestResult(Status.CANNOT_UNDERSTAND, str(error))
    else:
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
                                    services.settings.query, retrieve_ae, services.calibration)
    except NodeError as error:
        services.metrics.failed(f"similar_{error.status.name.lower()}")
        # The reasons name UIDs and option values, never patient data (UnknownStudyError omits accession numbers).
        LOG.warning("similar-case query from %s to %s refused with 0x%04X: %s", calling_ae(event), called_ae(event),
                    error.status, error)
        yield status(error.status, str(error)), None
        return
    LOG.info("similar-case query from %s: %d answers", calling_ae(event), len(answers))
    if wants_sheet and answers and services.sheets is not None:
        services.sheets.request(event.identifier)
    yield from send_answers(event, answers)


def _find_catalog(event: Event, services: Services) -> Iterator[Answer]:
    request = event.identifier
    try:
        level = query_level(request)
    except NodeError as error:
        yield status(error.status, str(error)), None
        return
    retrieve_ae = called_ae(event)
    answers = (response(request, level, values, retrieve_ae)
               for values in services.catalog.matches(matching_keys(request), level))
    count = yield from send_answers(event, answers)
    LOG.info("C-FIND from %s at %s level: %d matches sent", calling_ae(event), level, count)


def send_answers(event: Event, answers: Iterable[Dataset]) -> Generator[Answer, None, int]:
    """Send each answer to a C-FIND as a Pending response, its identifier written by `encode_identifier`; returns
    how many were sent. Only what ends the C-FIND early (a cancel, an answer that cannot be encoded) is yielded to
    pynetdicom's C-FIND service, which sends the final response (Success otherwise), as after a handler's last answer.

    The service would write each identifier it is given through pydicom, several times the CPU of the answer
    itself; the pending responses it would send are sent here instead, through the association's DIMSE provider,
    stopping where it would stop: at a C-CANCEL, or once the association is aborted or being released, and ending as
    it would on an answer that cannot be encoded (IDENTIFIER_NOT_ENCODED). Each answer is logged as it would log it
    (DEBUG, only with pynetdicom's response identifier logging on: ``logging.log_phi``)."""
    assoc, request, context = event.assoc, event.request, event.context
    pending = C_FIND()  # one for every answer, as pynetdicom's service does: each is encoded as it is sent
    pending.MessageID = pending.MessageIDBeingRespondedTo = request.MessageID
    pending.AffectedSOPClassUID = request.AffectedSOPClassUID
    pending.Status = Status.PENDING
    count = 0
    for answer in answers:
        if event.is_cancelled:
            yield Status.CANCEL, None
            return count
        if not assoc.is_established or assoc.acse.is_aborted() or assoc.acse.is_release_requested():
            return count
        try:
            pending.Identifier = BytesIO(encode_identifier(answer, context.transfer_syntax))
        except ValueError as error:
            LOG.error("C-FIND from %s ended with 0x%04X after %d answers: %s", calling_ae(event),
                      Status.IDENTIFIER_NOT_ENCODED, count, error)
            yield Status.IDENTIFIER_NOT_ENCODED, None
            return count
        if pynetdicom_config.LOG_RESPONSE_IDENTIFIERS and LOG.isEnabledFor(logging.DEBUG):
            LOG.debug("C-FIND response %d identifier:\n%s", count + 1, "\n".join(pretty_dataset(answer)))
        assoc.dimse.send_msg(pending, context.context_id)
        count += 1
    return count


def _instances(event: Event, services: Services) -> list[Stored]:
    """The stored instances a C-MOVE or C-GET names by its unique keys; NodeError when it names none properly."""
    level, keys = retrieve_keys(event.identifier)
    return [Stored(*row) for row in services.catalog.matching_instances(keys, level)]


def _refuse_retrieve(event: Event, services: Services, operation: str, error: NodeError) -> Answer:
    LOG.warning("%s from %s refused: %s", operation, calling_ae(event), error)
    services.metrics.failed(f"{operation.lower().replace('-', '_')}_identifier")
    return status(error.status, str(error)), None


def handle_move(event: Event, services: Services) -> Iterator[Any]:
    """C-MOVE to a configured peer only, of what the request names by unique keys."""
    peer = services.settings.peer(event.move_destination)
    if peer is None:
        LOG.warning("C-MOVE from %s to unknown destination refused", calling_ae(event))
        yield None, None
        return
    try:
        instances = _instances(event, services)
    except NodeError as error:
        # pynetdicom answers a C-MOVE only after associating with its destination: a Verification-only
        # association, on which nothing is sent, released after the refusal.
        yield peer.host, peer.port, {"contexts": [build_context(VERIFICATION)], "evt_handlers": NO_DELAY}
        yield 1
        yield _refuse_retrieve(event, services, "C-MOVE", error)
        return
    LOG.info("C-MOVE from %s to %s: %d instances", calling_ae(event), peer.ae_title, len(instances))
    receiver = Receiver(peer.ae_title)
    yield peer.host, peer.port, {"contexts": offered_contexts((i.sop_class, i.transfer_syntax) for i in instances),
                                 "evt_handlers": [*NO_DELAY, *receiver.handlers()]}
    yield len(instances)
    yield from send(event, receiver, services.store.absolute, instances)


def handle_get(event: Event, services: Services) -> Iterator[Any]:
    """C-GET: what the request names by unique keys, sent back on the same association."""
    try:
        instances = _instances(event, services)
    except NodeError as error:
        yield 1
        yield _refuse_retrieve(event, services, "C-GET", error)
        return
    LOG.info("C-GET from %s: %d instances", calling_ae(event), len(instances))
    receiver = Receiver(calling_ae(event), event.assoc)
    yield len(instances)
    event.assoc.bind(evt.EVT_DIMSE_RECV, receiver.check_response)
    try:
        yield from send(event, receiver, services.store.absolute, instances)
    finally:
        event.assoc.unbind(evt.EVT_DIMSE_RECV, receiver.check_response)
