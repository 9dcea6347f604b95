"""C-MOVE and C-GET: what a request must name, how each instance is offered and sent. One path for both.

A retrieve names what it takes by unique keys only (PS3.4 C.4.2.2.1: no wildcards, no universal
match), so that no request can take the whole archive. Each instance goes in its stored transfer syntax
when the receiver accepted that, else decoded into an uncompressed syntax it accepted; the stored file
is never changed.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from dicom_node.errors import NodeError
from dicom_node.sop_classes import UNCOMPRESSED
from dicom_node.status import Status

LOG = logging.getLogger(__name__)

# The unique keys a retrieve must give at each level: this level's and every level's above it.
UNIQUE_KEYS = {
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}
# Lossy transfer syntaxes and the LossyImageCompressionMethod each stands for (PS3.3 C.7.6.1.1.5.1).
LOSSY_METHOD = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}
MAX_CONTEXTS = 128  # PS3.8: presentation contexts one association may propose


@dataclass(frozen=True)
class Stored:
    """One stored instance a retrieve sends: its file (relative to the store) and how it is encoded."""

    path: str
    sop_class: str
    transfer_syntax: str


def _uids(identifier: Dataset, keyword: str) -> list[str]:
    value = identifier.get(keyword)
    if value is None:
        return []
    values = list(value) if isinstance(value, MultiValue) else str(value).split("\\")
    return [str(v).strip() for v in values]


def _is_uid(value: str) -> bool:
    parts = value.split(".")
    return 0 < len(value) <= 64 and all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts)


def retrieve_keys(identifier: Dataset) -> Dataset:
    """The identifier reduced to its level and unique keys, each one UID or a list of UIDs.

    Raises NodeError (answered 0xA900) for another level, a missing or empty key, a wildcard or any
    value that is not a UID: a retrieve must name what it takes.
    """
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in UNIQUE_KEYS:
        raise NodeError(f"QueryRetrieveLevel must be STUDY, SERIES or IMAGE, not {level[:8]!r}")
    keys = Dataset()
    keys.QueryRetrieveLevel = level
    for keyword in UNIQUE_KEYS[level]:
        uids = _uids(identifier, keyword)
        if not uids or not all(_is_uid(uid) for uid in uids):
            raise NodeError(f"{keyword} must be one UID or a UID list")
        setattr(keys, keyword, uids if len(uids) > 1 else uids[0])
    return keys


def offered_contexts(instances: Iterable[Stored]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax): each stored syntax, and both uncompressed syntaxes,
    so that a receiver can accept each that it can decode."""
    pairs = {(i.sop_class, ts) for i in instances for ts in (i.transfer_syntax, *UNCOMPRESSED)}
    contexts = [build_context(sop_class, ts) for sop_class, ts in sorted(pairs)]
    if len(contexts) > MAX_CONTEXTS:
        LOG.warning("retrieve needs %d presentation contexts; only %d can be proposed", len(contexts), MAX_CONTEXTS)
    return contexts[:MAX_CONTEXTS]


def accepted_syntaxes(assoc: Association) -> dict[str, set[str]]:
    """Per SOP class, the transfer syntaxes in which this node may send C-STORE on ``assoc``."""
    syntaxes: dict[str, set[str]] = {}
    for context in assoc.accepted_contexts:
        if context.as_scu:
            syntaxes.setdefault(context.abstract_syntax, set()).add(context.transfer_syntax[0])
    return syntaxes


def _uncompressed(ds: Dataset) -> Dataset:
    """``ds`` (read from its file, changed in memory only) with its pixel data decoded; a lossy source
    stays marked lossy (LossyImageCompression 01 with its ratio and method)."""
    source = UID(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds:  # nothing encapsulated: the rest of the dataset is already explicit VR LE
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    compressed_size = len(ds.PixelData)
    ds.decompress(generate_instance_uid=False)
    if source in LOSSY_METHOD and ds.get("LossyImageCompression", "01") == "01":
        ds.LossyImageCompression = "01"
        if "LossyImageCompressionRatio" not in ds:
            ds.LossyImageCompressionRatio = f"{len(ds.PixelData) / max(compressed_size, 1):.2f}"[:16]
        if "LossyImageCompressionMethod" not in ds:
            ds.LossyImageCompressionMethod = LOSSY_METHOD[source]
    return ds


def how_to_send(stored_syntax: str, accepted: set[str]) -> str | None:
    """"as stored", "decoded", or None when nothing the receiver accepted can carry this instance.

    pynetdicom itself converts between uncompressed syntaxes (explicit/implicit VR, deflated)."""
    syntax = UID(stored_syntax)
    if syntax in accepted or (not syntax.is_compressed and any(not UID(ts).is_compressed for ts in accepted)):
        return "as stored"
    if set(UNCOMPRESSED) & accepted:
        return "decoded"
    return None


class HeldSyntaxes:
    """Per SOP class, the transfer syntaxes the node holds instances in: read once, added to on each store."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._held: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        for sop_class, syntax in pairs:
            self.add(sop_class, syntax)

    def add(self, sop_class: str, syntax: str) -> None:
        with self._lock:
            self._held.setdefault(sop_class, set()).add(syntax)

    def only(self, sop_class: str) -> str | None:
        """The one syntax every held instance of ``sop_class`` is in, if there is one."""
        with self._lock:
            syntaxes = self._held.get(sop_class, set())
            return next(iter(syntaxes)) if len(syntaxes) == 1 else None


def prefer_stored_syntax(assoc: Association, held: HeldSyntaxes) -> None:
    """Before negotiation (EVT_REQUESTED): where a C-GET requestor offers this node the SCU role for a SOP
    class in one context with several syntaxes, accept the syntax its instances are stored in.

    pynetdicom accepts the first syntax of the acceptor's list that the requestor offers; only the order of
    this association's copy of the list changes. A class held in several syntaxes keeps the uncompressed
    syntaxes first, so that every instance can be sent (compressed ones decoded)."""
    roles = assoc.requestor.role_selection
    for context in assoc.acceptor.supported_contexts:
        role = roles.get(context.abstract_syntax)
        stored = held.only(context.abstract_syntax)
        if role is not None and role.scp_role and stored in context.transfer_syntax:
            context.transfer_syntax = [stored, *(ts for ts in context.transfer_syntax if ts != stored)]


@dataclass
class Receiver:
    """The association the sub-operations go on, and which of them the receiver refused.

    For C-GET it is the requestor's own; for C-MOVE pynetdicom opens it after the handler's second
    yield, and ``capture`` (an EVT_ACCEPTED handler on it) hands it over."""

    peer: str
    assoc: Association | None = None
    failed: list[str] = field(default_factory=list)

    def capture(self, event: Event) -> None:
        self.assoc = event.assoc

    def check_response(self, event: Event) -> None:
        """EVT_DIMSE_RECV: note and log (once) each C-STORE sub-operation the receiver answered with a failure."""
        command = event.message.command_set
        if command.get("CommandField") != 0x8001:  # C-STORE-RSP
            return
        code = int(command.Status)
        if code >= 0xA000 and code not in (0xB000, 0xB006, 0xB007):  # failure, not warning (PS3.4 B.2.3)
            uid = str(command.get("AffectedSOPInstanceUID", ""))
            self.failed.append(uid)
            LOG.warning("C-STORE sub-operation to %s failed with 0x%04X: SOP instance %s", self.peer, code, uid)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_ACCEPTED, self.capture), (evt.EVT_DIMSE_RECV, self.check_response)]


def send(event: Event, receiver: Receiver, absolute: Any, instances: list[Stored]) -> Iterator[tuple[Any, Any]]:
    """The (status, dataset) yields of a C-MOVE or C-GET after its count: each instance read from disk as
    it goes, in a syntax the receiver accepted; those it cannot take are failed at the end, each logged once."""
    assert receiver.assoc is not None
    accepted = accepted_syntaxes(receiver.assoc)
    unsendable: list[str] = []
    for stored in instances:
        if event.is_cancelled:
            yield Status.CANCEL, None
            return
        how = how_to_send(stored.transfer_syntax, accepted.get(stored.sop_class, set()))
        ds = dcmread(absolute(stored.path))
        if how is None:
            unsendable.append(str(ds.SOPInstanceUID))
            LOG.warning("C-STORE sub-operation to %s not attempted: no accepted context for %s in %s or "
                        "uncompressed: SOP instance %s", receiver.peer, UID(stored.sop_class).name,
                        UID(stored.transfer_syntax).name, ds.SOPInstanceUID)
            continue
        yield Status.PENDING, (_uncompressed(ds) if how == "decoded" else ds)
    if unsendable:
        # pynetdicom counts the instances not yielded as failed; the list names every failed one.
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = receiver.failed + unsendable
        some_sent = len(unsendable) + len(receiver.failed) < len(instances)
        yield Status.SUB_OPERATIONS_WITH_FAILURES if some_sent else Status.UNABLE_TO_PERFORM_SUB_OPERATIONS, failed
