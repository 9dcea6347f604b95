"""A real study in several encodings, how to put it into a node, and checks on what a retrieve delivered.

Images: the NEMA WG04 chest radiograph RG1 (../shared/data/dicom) as stored uncompressed, JPEG 2000
lossless and JPEG 2000 lossy, and an RLE copy made here.
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

RG1 = ("dicom", "pydicom-data_WG04_RG1")
SOURCES = {"explicit": "RG1_UNCR.dcm", "j2k": "RG1_J2KR.dcm", "j2k_lossy": "RG1_J2KI.dcm", "rle": "RG1_UNCR.dcm"}


@dataclass
class Study:
    """A study as files, by kind ("explicit", "j2k", "j2k_lossy", "rle", "sr")."""

    uid: str
    files: dict[str, Path] = field(default_factory=dict)  # kind -> file as stored in the node

    def sop(self, kind: str) -> str:
        return str(dcmread(self.files[kind], stop_before_pixels=True).SOPInstanceUID)


def rg1_study(shared_data: Path, folder: Path, *kinds: str) -> Study:
    """A study of RG1 images in the given encodings (new UIDs, one series) and a Basic Text SR report;
    "rle" is the uncompressed image encoded here with pydicom's RLE encoder."""
    study = Study(generate_uid(prefix=ROOT))
    series = generate_uid(prefix=ROOT)
    for kind in kinds:
        ds = dcmread(shared_data.joinpath(*RG1, SOURCES[kind]))
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
        if kind == "j2k_lossy":
            assert got.LossyImageCompression == "01" and got.LossyImageCompressionMethod == "ISO_15444_1"
            assert got.LossyImageCompressionRatio == original.LossyImageCompressionRatio
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
