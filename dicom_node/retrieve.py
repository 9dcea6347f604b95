"""C-MOVE and C-GET: what a request must name, how each instance is offered and sent. One path for both.

A retrieve names what it takes by unique keys only (PS3.4 C.4.2.2.1: no wildcards, no universal
match), so that no request can take the whole archive. Each instance goes in its stored transfer syntax
when the receiver accepted that, else decoded into an uncompressed syntax it accepted; the stored file
is never changed.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from copy import copy
from dataclasses import dataclass, field
from pathlib import Path
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
from pynetdicom.status import STATUS_FAILURE, code_to_category

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
C_STORE_RSP = 0x8001  # CommandField (PS3.7 E.1)
MAX_CONTEXTS = 128  # PS3.8: presentation contexts one association may propose


@dataclass(frozen=True)
class Stored:
    """One stored instance a retrieve sends: its UID, its file (relative to the store), how it is encoded."""

    sop_uid: str
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


def retrieve_keys(identifier: Dataset) -> tuple[str, dict[str, str]]:
    """The identifier's level and its unique keys, each one UID or a list of UIDs joined by backslashes.

    Raises NodeError (answered 0xA900) for another level, a missing or empty key, a wildcard or any
    value that is not a UID: a retrieve must name what it takes.
    """
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in UNIQUE_KEYS:
        raise NodeError(f"QueryRetrieveLevel must be STUDY, SERIES or IMAGE, not {level[:8]!r}")
    keys = {}
    for keyword in UNIQUE_KEYS[level]:
        uids = _uids(identifier, keyword)
        if not uids or not all(_is_uid(uid) for uid in uids):
            raise NodeError(f"{keyword} must be one UID or a UID list")
        keys[keyword] = "\\".join(uids)
    return level, keys


def offered_contexts(encodings: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """For C-STOREs of instances encoded as these (SOP class, transfer syntax) pairs: one context per SOP class
    and syntax, each stored syntax and both uncompressed ones, so a receiver can accept each it can decode."""
    pairs = {(sop_class, ts) for sop_class, stored in encodings for ts in (stored, *UNCOMPRESSED)}
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


def decoded(ds: Dataset) -> Dataset:
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


def for_receiver(ds: Dataset, accepted: set[str]) -> Dataset | None:
    """``ds`` as the receiver can take it: as stored when it accepted the stored syntax (or, for an
    uncompressed instance, any uncompressed one: pynetdicom converts), else decoded when it accepted an
    uncompressed syntax; None when it accepted neither."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax in accepted or (not syntax.is_compressed and any(not UID(ts).is_compressed for ts in accepted)):
        return ds
    if set(UNCOMPRESSED) & accepted:
        return decoded(ds)
    return None


class HeldSyntaxes:
    """Per SOP class, the transfer syntaxes the node holds instances in: read once, added to on each store."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._held: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        for sop_class, syntax in pairs:
            self.add(sop_class, syntax)

    def add(self, sop_class: str, syntax: str) -> bool:
        """Note that an instance of ``sop_class`` is held in ``syntax``; whether the pair is new."""
        with self._lock:
            syntaxes = self._held.setdefault(sop_class, set())
            new = syntax not in syntaxes
            syntaxes.add(syntax)
            return new

    def only(self, sop_class: str) -> str | None:
        """The one syntax every held instance of ``sop_class`` is in, if there is one."""
        with self._lock:
            syntaxes = self._held.get(sop_class, set())
            return next(iter(syntaxes)) if len(syntaxes) == 1 else None


def prefer_stored_syntax(assoc: Association, held: HeldSyntaxes) -> None:
    """Before negotiation (EVT_REQUESTED): where a C-GET requestor offers this node the SCU role for a SOP
    class in one context with several syntaxes, accept the syntax its instances are stored in.

    pynetdicom accepts the first syntax of the acceptor's list that the requestor offers; the context is
    replaced by a reordered copy in this association's list (the contexts in it are the server's, shared by every
    association). A class held in several syntaxes keeps the uncompressed syntaxes first, so that every
    instance can be sent (compressed ones decoded)."""
    roles = assoc.requestor.role_selection
    contexts = assoc.acceptor.supported_contexts
    for position, context in enumerate(contexts):
        role = roles.get(context.abstract_syntax)
        stored = held.only(context.abstract_syntax)
        if role is not None and role.scp_role and stored in context.transfer_syntax:
            preferred = copy(context)
            preferred.transfer_syntax = [stored, *(ts for ts in context.transfer_syntax if ts != stored)]
            contexts[position] = preferred


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
        if command.get("CommandField") != C_STORE_RSP or code_to_category(command.Status) != STATUS_FAILURE:
            return
        uid = str(command.get("AffectedSOPInstanceUID", ""))
        self.failed.append(uid)
        LOG.warning("C-STORE sub-operation to %s failed with 0x%04X: SOP instance %s", self.peer, command.Status, uid)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_ACCEPTED, self.capture), (evt.EVT_DIMSE_RECV, self.check_response)]


def send(event: Event, receiver: Receiver, absolute: Callable[[str], Path],
         instances: list[Stored]) -> Iterator[tuple[Any, Any]]:
    """The (status, dataset) yields of a C-MOVE or C-GET after its count: each instance read from disk as
    it goes, in a syntax the receiver accepted. One the receiver cannot take, or that cannot be read or
    decoded, is logged once and counted failed at the end (pynetdicom counts what was not yielded)."""
    if receiver.assoc is None:
        raise NodeError("retrieve: no association to send on")
    accepted = accepted_syntaxes(receiver.assoc)
    not_sent: list[str] = []
    for stored in instances:
        if event.is_cancelled:
            yield Status.CANCEL, None
            return
        try:
            ds = for_receiver(dcmread(absolute(stored.path)), accepted.get(stored.sop_class, set()))
        except Exception as error:  # a damaged file or codestream can raise many error types in pydicom/plugins
            ds, reason = None, f"cannot be read or decoded ({type(error).__name__})"
        else:
            reason = f"no accepted context for {UID(stored.sop_class).name} in {UID(stored.transfer_syntax).name}" \
                " or uncompressed"
        if ds is None:
            not_sent.append(stored.sop_uid)
            LOG.warning("C-STORE sub-operation to %s not attempted: SOP instance %s: %s", receiver.peer,
                        stored.sop_uid, reason)
            continue
        yield Status.PENDING, ds
    if not_sent:
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = receiver.failed + not_sent
        some_sent = len(not_sent) + len(receiver.failed) < len(instances)
        yield Status.SUB_OPERATIONS_WITH_FAILURES if some_sent else Status.UNABLE_TO_PERFORM_SUB_OPERATIONS, failed
