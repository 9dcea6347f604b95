"""A real study in several encodings, how to put it into a node, and checks on what a retrieve delivered.

Images (../shared/data/dicom): the NEMA WG04 chest radiograph RG1 as stored uncompressed, JPEG 2000
lossless and JPEG 2000 lossy, an RLE copy of it made here, a JPEG baseline chest radiograph and a copy of it
relabelled MONOCHROME1, and fo-dicom's 10-bit MONOCHROME1 chest radiograph without a Part 10 header.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE

from dicom_node.server import Node
from dicom_node.status import Status
from tests.dicom_node.builders import ROOT, basic_text_sr

RG1 = "dicom/pydicom-data_WG04_RG1"
SOURCES = {  # kind -> file under ../shared/data
    "explicit": f"{RG1}/RG1_UNCR.dcm",
    "j2k": f"{RG1}/RG1_J2KR.dcm",
    "j2k_lossy": f"{RG1}/RG1_J2KI.dcm",
    "rle": f"{RG1}/RG1_UNCR.dcm",
    # a JPEG baseline Secondary Capture chest radiograph (lossy, marked so in the file)
    "jpeg": "dicom/torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    # the same JPEG bytes relabelled MONOCHROME1 (a test artefact: shown inverted)
    "jpeg_mono1": "dicom/torchxrayvision_tests/derived_not_real/Fake_MONOHR1.dcm",
    # no Part 10 header: Implicit VR Little Endian, 10-bit MONOCHROME1
    "implicit": "dicom/fo-dicom/CR-MONO1-10-chest",
}


LOSSY = {"j2k_lossy": "ISO_15444_1", "jpeg": "ISO_10918_1"}  # kind -> LossyImageCompressionMethod


@dataclass(frozen=True)
class SampleInstance:
    """One file of a sample study, with the identifiers a query or retrieve of it names."""

    study: str
    series: str
    sop: str
    file: Path
    syntax: str  # its transfer syntax UID, as stored
    patient: str
    accession: str


@dataclass
class Study:
    """A study as files, by kind (a key of SOURCES, or "sr")."""

    uid: str
    patient: str = "9RG1"  # the report's; the images keep the source's own unless sample_study was given one
    accession: str = ""
    files: dict[str, Path] = field(default_factory=dict)  # kind -> file as stored in the node

    def sop(self, kind: str) -> str:
        return str(dcmread(self.files[kind], stop_before_pixels=True).SOPInstanceUID)

    def instance(self, kind: str) -> SampleInstance:
        ds = dcmread(self.files[kind], stop_before_pixels=True)
        return SampleInstance(self.uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), self.files[kind],
                              str(ds.file_meta.TransferSyntaxUID), self.patient, self.accession)


def sample_study(shared_data: Path, folder: Path, *kinds: str, patient: str | None = None, accession: str = "",
                 date: str | None = None, report: bool = True) -> Study:
    """A study of the given kinds of image (new UIDs, one series) and, with ``report``, a Basic Text SR report;
    "rle" is RG1 encoded here with pydicom's RLE encoder. ``patient``, ``accession``, ``date``: written into
    the images too (else they keep the source's patient and accession)."""
    study = Study(generate_uid(prefix=ROOT), patient or "9RG1", accession)
    series = generate_uid(prefix=ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        ds = dcmread(shared_data / SOURCES[kind], force=True)
        if "TransferSyntaxUID" not in ds.file_meta:  # a bare dataset ("implicit"): give it its Part 10 header
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        if kind == "rle":
            ds.compress(RLELossless)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=ROOT)
        if patient is not None:
            ds.PatientID, ds.AccessionNumber = patient, accession
        if date is not None:
            ds.StudyDate = date
        if [float(v) for v in ds.get("PixelSpacing", [1])] == [0.0, 0.0]:
            del ds.PixelSpacing  # WG04 RG1 says 0\0: a zero-sized pixel, which OHIF's renderer draws as nothing
        study.files[kind] = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(study.files[kind], enforce_file_format=True)
    if report:
        sr = basic_text_sr(study.uid, study.patient, accession, "Lungs are clear.", "No acute disease.")
        study.files["sr"] = folder / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(study.files["sr"], enforce_file_format=True)
    return study


def upload(node: Node, study: Study) -> None:
    """C-STORE each file in its own transfer syntax (pynetdicom as the modality)."""
    ae = AE("PACS")
    for path in study.files.values():
        ds = dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert assoc.is_established
    for path in study.files.values():
        assert assoc.send_c_store(path).Status == Status.SUCCESS
    assoc.release()


def by_sop(folder: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(dcmread, folder.iterdir())}


def assert_decoded_whole(study: Study, received: dict[str, Dataset]) -> None:
    """Every instance arrived uncompressed, its pixels those of the decoded original; lossy stays marked."""
    assert set(received) == {study.sop(kind) for kind in study.files}
    for kind, path in study.files.items():
        original, got = dcmread(path), received[study.sop(kind)]
        assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        if kind == "sr":
            assert got.ContentSequence == original.ContentSequence
            continue
        assert np.array_equal(got.pixel_array, original.pixel_array), kind
        if kind in LOSSY:
            assert got.LossyImageCompression == "01" and got.LossyImageCompressionMethod == LOSSY[kind]
            # the file's own ratio, else the ratio of this compression
            ratio = original.get("LossyImageCompressionRatio", len(got.PixelData) / len(original.PixelData))
            assert abs(float(got.LossyImageCompressionRatio) - float(ratio)) < 0.01, kind
        else:
            assert got.get("LossyImageCompression", "00") == "00"


def codestream(ds: Dataset) -> bytes:
    """The compressed bytes of encapsulated pixel data, whatever its fragments and offset table."""
    return b"".join(list(generate_fragments(ds.PixelData))[1:])  # the first item is the offset table


def assert_as_stored(study: Study, received: dict[str, Dataset], *, same_fragments: bool = True) -> None:
    """Every instance arrived in its stored transfer syntax with its stored pixel data bytes; with
    ``same_fragments=False`` the compressed bytes may be split into other fragments, with another offset
    table (dcmjs-dimse does so when it writes a file), but are the same bytes."""
    assert set(received) == {study.sop(kind) for kind in study.files}
    for kind, path in study.files.items():
        original, got = dcmread(path), received[study.sop(kind)]
        syntax = original.file_meta.TransferSyntaxUID
        assert got.file_meta.TransferSyntaxUID == syntax, kind
        if kind == "sr":
            continue
        if same_fragments or not syntax.is_compressed:
            assert got.PixelData == original.PixelData, kind
        else:
            assert codestream(got) == codestream(original), kind
