"""A real study in several encodings, how to put it into a node, and checks on what a retrieve delivered.

Images (../shared/data/dicom): the NEMA WG04 chest radiograph RG1 as stored uncompressed, JPEG 2000
lossless and JPEG 2000 lossy, an RLE copy of it made here, and a JPEG baseline chest radiograph.
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
}


LOSSY = {"j2k_lossy": "ISO_15444_1", "jpeg": "ISO_10918_1"}  # kind -> LossyImageCompressionMethod


@dataclass
class Study:
    """A study as files, by kind (a key of SOURCES, or "sr")."""

    uid: str
    files: dict[str, Path] = field(default_factory=dict)  # kind -> file as stored in the node

    def sop(self, kind: str) -> str:
        return str(dcmread(self.files[kind], stop_before_pixels=True).SOPInstanceUID)


def sample_study(shared_data: Path, folder: Path, *kinds: str) -> Study:
    """A study of the given kinds of image (new UIDs, one series) and a Basic Text SR report; "rle" is RG1
    encoded here with pydicom's RLE encoder."""
    study = Study(generate_uid(prefix=ROOT))
    series = generate_uid(prefix=ROOT)
    for kind in kinds:
        ds = dcmread(shared_data / SOURCES[kind])
        if kind == "rle":
            ds.compress(RLELossless)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=ROOT)
        study.files[kind] = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(study.files[kind], enforce_file_format=True)
    report = basic_text_sr(study.uid, "9RG1", "", "Lungs are clear.", "No acute disease.")
    study.files["sr"] = folder / f"{report.SOPInstanceUID}.dcm"
    report.save_as(study.files["sr"], enforce_file_format=True)
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
