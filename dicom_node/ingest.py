"""Receiving one dataset: check it, write it durably, record it (and its report) in the catalog.

Used by the C-STORE handler; it never decodes pixel data and never imports torch.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.valuerep import VR

from dicom_node.errors import NodeError
from dicom_node.retrieve import HeldSyntaxes
from dicom_node.sheet_marker import is_reference_sheet
from dicom_node.sop_classes import STORAGE_KIND
from dicom_node.sr import report_text, report_time
from dicom_node.status import Status
from dicom_node.storage import FileStore, check_uid
from indexer.errors import IndexerError
from indexer.catalog import AddOutcome, Catalog, InstanceAttrs, ReportAttrs, SeriesAttrs, StudyAttrs
from indexer.schema import LEVELS, Kind, keys_of_level

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    status: Status
    comment: str = ""
    outcome: AddOutcome | None = None
    size: int = 0


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _ends_with(path: Path, suffix: bytes) -> bool:
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < len(suffix):
            return False
        handle.seek(-len(suffix), os.SEEK_END)
        return handle.read() == suffix


def check_pixel_data(ds: Dataset, received: Path) -> None:
    """Refuse pixel data cut short in transit: pydicom reads a truncated last element without complaint.
    Works on the element as read (never converted here), its value possibly left in the file: what the file
    holds from the value's offset on, up to its declared length, must cover what the image attributes call for."""
    if "PixelData" not in ds or "DataSetTrailingPadding" in ds:
        return
    element = ds.get_item("PixelData", keep_deferred=True)
    if element.length == _UNDEFINED_LENGTH:  # encapsulated: the fragments must end with their delimiter
        if not _ends_with(received, _SEQUENCE_DELIMITER):
            raise NodeError("encapsulated pixel data is not terminated (truncated dataset)")
        return
    try:
        expected = get_expected_length(ds)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise NodeError(f"pixel data without valid image attributes ({error})") from None
    if element.value is None:  # deferred: left in the file, which may end before the declared length
        actual = max(0, min(element.length, received.stat().st_size - element.value_tell))
    else:
        actual = len(element.value)
    if actual < expected:
        raise NodeError(f"pixel data truncated: {actual} of {expected} bytes")


_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


# Values longer than this are left in the file while it is read (the pixel data, which is never decoded here).
_DEFER_BYTES = 64 * 1024
_PIXEL_DATA = Tag("PixelData")


def _decode_elements(ds: Dataset) -> None:
    """Decode every element of ``ds`` and of its sequence items, so that a malformed one raises here. Pixel
    data is left as read: raw bytes, nothing to decode, possibly still in the file."""
    for tag in ds.keys():
        if tag != _PIXEL_DATA:
            element = ds[tag]
            if element.VR == VR.SQ:
                for item in element.value:
                    _decode_elements(item)


def read_received(received: Path) -> Dataset:
    """The dataset pynetdicom wrote to ``received``, every element but the pixel data decoded and large values
    left in the file; NodeError when it cannot be understood: not parsable, empty or without any identifying
    attribute (bytes that are not DICOM: pydicom reads much of that without complaint), or pixel data cut short."""
    try:
        ds = dcmread(received, defer_size=_DEFER_BYTES)
        _decode_elements(ds)
    except Exception as error:  # a malformed encoding can raise many error types inside pydicom
        raise NodeError(f"dataset cannot be parsed ({type(error).__name__})") from None
    if not any(keyword in ds for keyword in _IDENTIFYING):
        raise NodeError("no DICOM dataset: empty or without any SOP, study or series UID")
    check_pixel_data(ds, received)
    return ds


# Each level's keys as (tag, column, size): an element looked up by its tag skips pydicom's keyword look-up, a
# measurable share of the receive path's CPU at twenty keys per instance.
_KEY_TAGS = {level: tuple((Tag(keyword), key.column, key.max_length) for keyword, key in keys_of_level(level).items())
             for level in LEVELS}


def key_values(ds: Dataset, level: str) -> dict[str, str]:
    """The catalog columns of the keys at ``level`` (``indexer.schema.QUERY_KEYS``) with the dataset's values,
    each cut to its column's size ("" when absent)."""
    values = {}
    for tag, column, size in _KEY_TAGS[level]:
        element = ds.get(tag)
        value = element.value if element is not None else ""
        values[column] = str(value or "").strip()[:size]
    return values


class Stripes:
    """Locks over stripes of SOP Instance UIDs, each held across the threads of a process and across the processes
    storing into one store (the node and its receivers: a lock file per stripe in ``folder``), so that two copies
    of one instance arriving at once are stored one after the other."""

    def __init__(self, folder: Path, count: int = 64) -> None:
        folder.mkdir(exist_ok=True)
        self._paths = [folder / f"stripe-{number}.lock" for number in range(count)]
        for path in self._paths:
            path.touch(mode=0o600)
        self._threads = [threading.Lock() for _ in range(count)]

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        number = zlib.crc32(key.encode()) % len(self._paths)  # the same stripe in every process (hash() is not)
        with self._threads[number]:  # a lock file is held per open file: it does not exclude the process' threads
            descriptor = os.open(self._paths[number], os.O_RDWR)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)  # releases the lock


class Ingestor:
    """Stores datasets; a lock per stripe of SOP Instance UIDs keeps resends of one instance in order."""

    def __init__(self, store: FileStore, catalog: Catalog, held: HeldSyntaxes, locks: Path) -> None:
        self.store = store
        self.catalog = catalog
        self.held = held  # the (SOP class, syntax) pairs held, which C-GET negotiation prefers
        self.stripes = Stripes(locks)

    def ingest(self, ds: Dataset, received: Path, sop_class_uid: str, transfer_syntax: str, calling_ae: str) -> IngestResult:
        """Keep ``received`` (the dataset as received, with its file meta, in the store's ``incoming``
        folder) and catalog it. The file is renamed into the store or left for the caller to delete."""
        kind = STORAGE_KIND.get(sop_class_uid)
        if kind is None:
            return IngestResult(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"SOP Class {sop_class_uid} is not stored here")
        if kind is Kind.IMAGE and is_reference_sheet(ds):
            kind = Kind.SHEET  # the node's own sheet: kept and retrievable, never embedded
        try:
            study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            if str(ds.get("SOPClassUID", "")).strip() != sop_class_uid:
                raise NodeError(f"SOPClassUID of the dataset does not match the presentation context ({sop_class_uid})")
            report = (
                ReportAttrs(text=report_text(ds), report_time=report_time(ds)) if kind is Kind.REPORT else None
            )
            relative = self.store.relative_path(study_uid, series_uid, sop_uid)
            study, series = StudyAttrs(**key_values(ds, "STUDY")), SeriesAttrs(**key_values(ds, "SERIES"))
            instance_keys = key_values(ds, "IMAGE")
        except (NodeError, ValueError, TypeError, AttributeError, KeyError) as error:
            return IngestResult(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(error))
        if report is not None and not report.text:
            report = None  # an SR without any text is kept and retrievable, but there is nothing to embed

        with self.stripes.hold(sop_uid):
            held_in = self.catalog.find_instance_study(sop_uid)
            if held_in is not None:
                return self._duplicate(sop_uid, held_in == study_uid)
            size = received.stat().st_size
            if not self.store.has_room(size):
                LOG.error("instance %s refused: free disk space below the configured watermark", sop_uid)
                return IngestResult(Status.OUT_OF_RESOURCES, "storage full: free disk below the watermark")
            try:
                self.store.keep(relative, received)
            except OSError as error:
                LOG.error("cannot write instance %s: %s", sop_uid, error)
                return IngestResult(Status.OUT_OF_RESOURCES, f"cannot write to storage: {error.strerror}")
            instance = InstanceAttrs(**instance_keys, transfer_syntax=transfer_syntax, path=relative, size_bytes=size,
                                     kind=kind, calling_ae=calling_ae)
            try:
                outcome = self.catalog.add_instance(study, series, instance, report)
            except IndexerError as error:
                self.store.remove(relative)
                return IngestResult(Status.CANNOT_UNDERSTAND, str(error))
            except Exception as error:  # the catalog refused: the file must not stay as if stored
                self.store.remove(relative)
                LOG.error("catalog refused instance %s: %s", sop_uid, type(error).__name__)
                return IngestResult(Status.OUT_OF_RESOURCES, f"catalog error: {type(error).__name__}")
        if outcome is AddOutcome.STORED:
            self.held.add(sop_class_uid, transfer_syntax)
            LOG.info("stored %s instance %s of study %s from %s (%d bytes)", kind.value, sop_uid, study_uid,
                     calling_ae, size)
            return IngestResult(Status.SUCCESS, outcome=outcome, size=size)
        if outcome is AddOutcome.CONFLICT:
            self.store.remove(relative)
        return self._duplicate(sop_uid, outcome is AddOutcome.DUPLICATE)

    @staticmethod
    def _duplicate(sop_uid: str, same_study: bool) -> IngestResult:
        if same_study:
            LOG.info("instance %s already held; resend acknowledged, nothing changed", sop_uid)
            return IngestResult(Status.SUCCESS, outcome=AddOutcome.DUPLICATE)
        LOG.warning("instance %s refused: the UID is already held under another study", sop_uid)
        return IngestResult(Status.DUPLICATE_CONFLICT,
                            "SOP Instance UID already held under another study", AddOutcome.CONFLICT)
