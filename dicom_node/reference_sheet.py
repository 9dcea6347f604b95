"""The reference sheet: the top-k similar cases as one Secondary Capture image stored into the query study.

Any viewer shows a DICOM image of the study being read, so the sheet brings the similar cases to viewers
that cannot query the node. It is a montage of one image of each similar study with its rank, score and
predicted findings (the same ``describe`` text as the C-FIND answers) under the label "Reference cases -
not this patient". It carries the query study's own patient and study attributes and nothing of the
other patients: no name, ID, date or UID of theirs, and no picture flagged as carrying burned-in text.

It is built in a series of its own (one per study, "MMDL reference cases"), kept in the node through
the same ingest path as a received instance (recognised there by its private block, so never embedded),
and sent with C-STORE to the configured peer. Built on request (the similar-case C-FIND option, or
``ReferenceSheets.create``), and with ``for_every_new_study`` once for each new study when it is indexed.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE

from config.settings import Peer, Settings
from dicom_node.errors import NodeError
from dicom_node.handlers import NO_DELAY
from dicom_node.ingest import Ingestor
from dicom_node.retrieve import offered_contexts
from dicom_node.sheet_marker import SHEET_CASES, SHEET_CREATOR, SHEET_GROUP, SHEET_MODEL_VERSION, SHEET_TYPE, SHEET_TYPE_VALUE
from dicom_node.similar import (
    Hit,
    SimilarRequest,
    describe,
    find_similar,
    match_probability,
    parse_request,
    query_study,
    shown_findings,
)
from dicom_node.status import Status
from dicom_node.storage import FileStore
from indexer.catalog import Catalog, StudyRow
from indexer.schema import Kind
from indexer.vector_index import VectorIndex
from models.calibration import Calibration
from models.errors import ModelError


if TYPE_CHECKING:  # imported by the node only: it imports the image decoder (torch)
    from dicom_node.web.render import Renderer

LOG = logging.getLogger(__name__)

LABEL = "Reference cases - not this patient"
SERIES_DESCRIPTION = "MMDL reference cases"
SERIES_NUMBER = 9901
MAX_CASES = 20  # a sheet stays readable; a query asking for more gets its first 20
TILE = 320  # the square each case's picture is fitted into, pixels
PAD = 16
CAPTION_LINES = 3
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian fonts-dejavu-core


class SheetError(NodeError):
    def __init__(self, study_uid: str, reason: str) -> None:
        super().__init__(f"reference sheet of {study_uid}: {reason}")


class NoSimilarCaseError(SheetError):
    def __init__(self, study_uid: str) -> None:
        super().__init__(study_uid, "no similar case to show")


class SheetNotSentError(SheetError):
    def __init__(self, study_uid: str, destination: str, status: int | None) -> None:
        answer = "no association" if status is None else f"status 0x{status:04X}"
        super().__init__(study_uid, f"{destination} did not take it ({answer}); not kept, built again later")


class SheetsDisabledError(NodeError):
    def __init__(self) -> None:
        super().__init__("reference sheets are not built on request here ([reference_sheet] enabled = false)")


@dataclass(frozen=True)
class SheetResult:
    """What one request produced: the sheet's UIDs, how many cases it shows, and where it went."""

    study_uid: str
    series_uid: str
    sop_uid: str
    cases: int
    destination: str  # the peer it was sent to, "" when none is configured
    send_status: int | None  # the peer's C-STORE status; None when not sent (no peer, or no association)


@dataclass(frozen=True)
class Layout:
    """Where things go on a sheet of ``cases`` tiles: a header band, then rows of tile + caption."""

    cases: int
    font_px: int = 17
    header_px: int = 100  # the label, and under it the note in up to two lines

    @property
    def columns(self) -> int:
        return min(self.cases, 5)

    @property
    def line_px(self) -> int:
        return self.font_px + 5

    @property
    def cell(self) -> tuple[int, int]:
        return TILE + PAD, TILE + CAPTION_LINES * self.line_px + 2 * PAD

    @property
    def size(self) -> tuple[int, int]:
        rows = math.ceil(self.cases / self.columns)
        width, height = self.cell
        return self.columns * width + PAD, self.header_px + rows * height

    def tile_box(self, index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the square holding case ``index``'s picture (0-based)."""
        row, column = divmod(index, self.columns)
        width, height = self.cell
        left, top = PAD + column * width, self.header_px + row * height
        return left, top, left + TILE, top + TILE


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    if path.exists():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, lines: int) -> list[str]:
    """``text`` broken at spaces into at most ``lines`` lines of ``width`` pixels (the last one cut with ...)."""
    out: list[str] = []
    for word in text.split():
        if out and font.getlength(f"{out[-1]} {word}") <= width:
            out[-1] = f"{out[-1]} {word}"
        else:
            out.append(word)
    if len(out) > lines:
        last = " ".join(out[lines - 1:])
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        out = [*out[: lines - 1], last + "..."]
    return out


def render_sheet(cases: list[tuple[Image.Image | None, str]], model_version: str) -> np.ndarray:
    """The montage: each case's picture (None: a placeholder) fitted into its tile, its caption under it."""
    layout = Layout(len(cases))
    sheet = Image.new("L", layout.size, 0)
    draw = ImageDraw.Draw(sheet)
    title = _font(30, bold=True)
    draw.text((PAD, PAD), LABEL, fill=255, font=title)
    caption = _font(layout.font_px)
    note = f"similar prior studies of other patients, ranked by {model_version}; research software, not for diagnosis"
    for n, line in enumerate(_wrap(note, caption, layout.size[0] - 2 * PAD, 2)):
        draw.text((PAD, PAD + 40 + n * layout.line_px), line, fill=160, font=caption)
    for index, (picture, text) in enumerate(cases):
        left, top, right, bottom = layout.tile_box(index)
        if picture is None:
            draw.rectangle((left, top, right - 1, bottom - 1), outline=128)
            draw.text((left + PAD, top + TILE // 2), "no picture without burned-in text", fill=160, font=caption)
        else:
            sheet.paste(picture, (left + (TILE - picture.width) // 2, top + (TILE - picture.height) // 2))
        for n, line in enumerate(_wrap(text, caption, TILE, CAPTION_LINES)):
            draw.text((left, bottom + PAD // 2 + n * layout.line_px), line, fill=255, font=caption)
    return np.asarray(sheet, dtype=np.uint8)


def sheet_series_uid(study_uid: str) -> str:
    """The sheets' series of a study: the same UID every time, so all its sheets share one series."""
    return str(generate_uid(entropy_srcs=[study_uid, SERIES_DESCRIPTION]))


def automatic_sheet_uid(study_uid: str) -> str:
    """The SOP Instance UID of a study's sheet built by ``for_every_new_study``: one per study, ever."""
    return str(generate_uid(entropy_srcs=[study_uid, SERIES_DESCRIPTION, "for every new study"]))


def build_dataset(reference: Dataset, pixels: np.ndarray, sop_uid: str, instance_number: int, cases: int,
                  model_version: str) -> Dataset:
    """The Secondary Capture: the query study's patient and study attributes (copied from ``reference``,
    an instance of that study), a series of its own, the montage, and the node's private block."""
    from highdicom.sc import SCImage  # imported here: highdicom takes about a second to import

    sc = SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # A montage has no patient orientation; highdicom requires one for the PATIENT coordinate system,
        # and PatientOrientation (type 2C) is then emptied below, as is Laterality (2C; a montage has none).
        patient_orientation=("L", "F"),
        series_instance_uid=sheet_series_uid(str(reference.StudyInstanceUID)),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer="mmdl-node",
        series_description=SERIES_DESCRIPTION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.PatientOrientation = None
    sc.Laterality = None
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    # BurnedInAnnotation means "enough burned-in text to identify the patient and the date the image was
    # acquired" (PS3.3 C.7.6.1, General Image Module): the sheet's text is the label, the model, ranks, scores
    # and findings, and its pictures are only taken from images not flagged YES: nothing on it identifies
    # anyone, so NO (YES would also make de-identifying tools drop a sheet that carries no identity).
    sc.BurnedInAnnotation = "NO"
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = LABEL
    sc.DerivationDescription = f"Montage of {cases} similar cases of other patients ranked by MMDL {model_version}"[:1024]
    block = sc.private_block(SHEET_GROUP, SHEET_CREATOR, create=True)
    block.add_new(SHEET_TYPE, "LO", SHEET_TYPE_VALUE)
    block.add_new(SHEET_MODEL_VERSION, "LO", model_version[:64])
    block.add_new(SHEET_CASES, "IS", str(cases))
    return sc


def c_store(peer: Peer, calling_ae: str, path: Path, sop_class: str, transfer_syntax: str,
            timeout_s: float) -> int | None:
    """Send one DICOM file to ``peer``; its C-STORE status, or None when no association was made."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = offered_contexts([(sop_class, transfer_syntax)])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=NO_DELAY)
    if not assoc.is_established:
        return None
    try:
        answer = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(answer.Status) if "Status" in answer else None


class ReferenceSheets:
    """Builds, keeps and sends reference sheets; one at a time, on a worker thread for C-FIND requests."""

    def __init__(self, settings: Settings, catalog: Catalog, index: VectorIndex, store: FileStore,
                 ingestor: Ingestor, renderer: Renderer, calibration: Calibration | None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.index = index
        self.store = store
        self.ingestor = ingestor
        self.renderer = renderer
        self.calibration = calibration
        self._lock = threading.Lock()  # one sheet at a time: instance numbers, and the CPU of a small node
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sheet")

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def default_request(self, study_uid: str, top_k: int | None = None) -> SimilarRequest:
        query = self.settings.query
        return SimilarRequest(study_uid=study_uid, accession_number="",
                              top_k=top_k or self.settings.reference_sheet.top_k,
                              min_score=query.min_score, exclude_same_patient=True, search_depth=query.search_depth)

    def create(self, study_uid: str, request: SimilarRequest | None = None) -> SheetResult:
        """On request (the HTTP POST, the C-FIND option): build the sheet of a study's similar cases, keep it,
        and send it to the configured peer.

        Raises SheetsDisabledError unless ``[reference_sheet] enabled``, UnknownStudyError / NotIndexedError
        (from the search), and SheetError (no case to show, or the node refused to keep it)."""
        if not self.settings.reference_sheet.enabled:
            raise SheetsDisabledError()
        return self._build(request or self.default_request(study_uid))

    def _build(self, request: SimilarRequest, sop_uid: str = "", must_send: bool = False) -> SheetResult:
        """Search, render, build; send, then keep. With ``must_send``, a sheet the peer did not take is not
        kept either (SheetNotSentError), so that the every-new-study job builds and sends it again later."""
        # "not this patient": the sheet never shows the patient's own studies, whatever the query asked
        request = replace(request, top_k=min(request.top_k, MAX_CASES), exclude_same_patient=True)
        with self._lock:
            study = query_study(self.catalog, request)
            hits = find_similar(self.catalog, self.index, study, request, self.calibration)
            if not hits:
                raise NoSimilarCaseError(study.study_uid)
            reference = self._reference(study)
            model_version = hits[0].study.model_version
            pixels = render_sheet([(self._picture(hit), self._caption(hit)) for hit in hits], model_version)
            number = self._sheet_count(study.id) + 1
            ds = build_dataset(reference, pixels, sop_uid or str(generate_uid()), number, len(hits), model_version)
            temporary = self._write(ds)
            try:
                sent = self._send(temporary)
                destination = self.settings.reference_sheet.destination
                if must_send and destination and sent != Status.SUCCESS:
                    raise SheetNotSentError(study.study_uid, destination, sent)
                self._keep(ds, temporary)
            finally:
                temporary.unlink(missing_ok=True)  # a kept file was renamed away
        level = logging.WARNING if destination and sent != Status.SUCCESS else logging.INFO
        LOG.log(level, "reference sheet %s of study %s: %d cases, sent to %s with status %s", ds.SOPInstanceUID,
                study.study_uid, len(hits), destination or "nobody", "none" if sent is None else f"0x{sent:04X}")
        return SheetResult(study.study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), len(hits),
                           destination, sent)

    def request(self, identifier: Dataset) -> None:
        """A similar-case C-FIND asked for a sheet: build it in the background, with the query's own options."""
        self._worker.submit(self._create_logged, parse_request(identifier, self.settings.query))

    def _create_logged(self, request: SimilarRequest) -> None:
        try:
            self.create(request.study_uid, request)
        except NodeError as error:
            LOG.warning("reference sheet not built: %s", error)
        except Exception as error:  # on the worker thread nobody else would see it; the type only (no PHI)
            LOG.error("reference sheet of study %s failed: %s", request.study_uid, type(error).__name__)

    def create_for_new_studies(self, limit: int = 16) -> int:
        """The ``for_every_new_study`` job: one sheet for each indexed study received within
        ``new_study_max_age_h`` that has none yet. Its sheet's UID is fixed by the study, so a study is
        never given two, across restarts too; nothing while the index loads. Returns how many sheets were built."""
        built = 0
        if not self.index.ready:
            return built
        for study_uid in self._studies_without_sheet(limit):
            try:
                self._build(self.default_request(study_uid), automatic_sheet_uid(study_uid), must_send=True)
                built += 1
            except NoSimilarCaseError as error:  # the first studies of a node: tried again next time, quietly
                LOG.debug("%s", error)
            except SheetNotSentError as error:  # the peer is down: the next look tries again
                LOG.warning("%s", error)
                break
            except NodeError as error:
                LOG.warning("reference sheet not built: %s", error)
        return built

    def _studies_without_sheet(self, limit: int) -> list[str]:
        since = datetime.now(timezone.utc) - timedelta(hours=self.settings.reference_sheet.new_study_max_age_h)
        wanted = {automatic_sheet_uid(uid): uid for uid in self.catalog.indexed_studies_since(since)}
        held = self.catalog.held_instances(list(wanted))
        return [uid for sheet, uid in wanted.items() if sheet not in held][:limit]

    def _sheet_count(self, study_pk: int) -> int:
        return len(self.catalog.instance_paths(study_pk, (Kind.SHEET,)))

    def _reference(self, study: StudyRow) -> Dataset:
        """An instance of the query study (not a sheet), whose patient and study attributes the sheet copies."""
        paths = self.catalog.instance_paths(study.id, (Kind.IMAGE, Kind.REPORT))
        if not paths:
            raise SheetError(study.study_uid, "the study holds no instance to take its attributes from")
        return dcmread(self.store.absolute(paths[0]), stop_before_pixels=True)

    def _picture(self, hit: Hit) -> Image.Image | None:
        """The first embedded image of the hit's study not flagged as carrying burned-in text, fitted to a tile."""
        for relative in self.catalog.instance_paths(hit.study.id, (Kind.IMAGE,), indexed_only=True):
            header = dcmread(self.store.absolute(relative), stop_before_pixels=True,
                             specific_tags=["BurnedInAnnotation"])
            if str(header.get("BurnedInAnnotation", "")).strip().upper() == "YES":
                continue
            try:
                return self.renderer.picture(relative, TILE)
            except ModelError as error:  # an image the decoder cannot read: the next one, else an empty tile
                LOG.warning("reference sheet tile from %s not rendered: %s", relative, type(error).__name__)
        return None

    def _caption(self, hit: Hit) -> str:
        """The text of the hit's C-FIND answer: rank, match probability (or cosine), calibrated findings."""
        findings = [name for name, _ in shown_findings(self.calibration, hit.study, hit.finding_scores)]
        match = match_probability(self.calibration, hit.study, hit.score)
        return describe(hit.rank, hit.score, match, findings, limit=1024)

    def _write(self, ds: Dataset) -> Path:
        """The sheet as a file in the store's incoming folder, where received datasets arrive."""
        handle, name = tempfile.mkstemp(dir=self.store.incoming, suffix=".dcm")
        os.close(handle)
        ds.save_as(name, enforce_file_format=True)
        return Path(name)

    def _keep(self, ds: Dataset, written: Path) -> None:
        """Store and catalog the sheet through the receive path (which renames ``written`` into the store)."""
        result = self.ingestor.ingest(ds, written, sop_class_uid=SecondaryCaptureImageStorage,
                                      transfer_syntax=ExplicitVRLittleEndian, calling_ae=self.settings.node.ae_title)
        if result.status is not Status.SUCCESS:
            raise SheetError(str(ds.StudyInstanceUID), f"not kept: {result.comment}")

    def _send(self, path: Path) -> int | None:
        destination = self.settings.reference_sheet.destination
        peer = self.settings.peer(destination) if destination else None
        if peer is None:
            return None
        return c_store(peer, self.settings.node.ae_title, path, SecondaryCaptureImageStorage,
                       ExplicitVRLittleEndian, self.settings.node.network_timeout_s)
