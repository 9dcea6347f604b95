"""Real DICOM objects for tests: DX images made from the public PNGs, and Basic Text SR reports."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom.sop_class import BasicTextSRStorage, DigitalXRayImageStorageForPresentation

ROOT = "1.2.826.0.1.3680043.8.498."


def _base(sop_class: str, study_uid: str, patient_id: str, accession: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(prefix=ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT)
    ds.PatientID = patient_id
    ds.PatientName = f"TEST^{patient_id}"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyDate = "20240105"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST PA"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def dx_from_png(png: Path, study_uid: str, patient_id: str, accession: str) -> Dataset:
    """A DX For Presentation image (12-bit, MONOCHROME2) carrying the PNG's pixels."""
    return dx_from_pixels(np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 16, study_uid, patient_id,
                          accession)


def dx_synthetic(study_uid: str, patient_id: str, accession: str, size: int = 32, seed: int = 0) -> Dataset:
    """A small DX image of random 12-bit noise, for tests about volume rather than content."""
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(size, size), dtype=np.uint16)
    return dx_from_pixels(pixels, study_uid, patient_id, accession)


def dx_from_pixels(pixels: np.ndarray, study_uid: str, patient_id: str, accession: str) -> Dataset:
    """A DX For Presentation image (12-bit, MONOCHROME2) with these pixels."""
    ds = _base(DigitalXRayImageStorageForPresentation, study_uid, patient_id, accession, "DX")
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def undecodable(ds: Dataset) -> Dataset:
    """``ds`` as well-formed DICOM (received and kept as sent) whose JPEG 2000 stream is not an image."""
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream" * 10])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


def _text_item(code: str, meaning: str, text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = code, "LN", meaning
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = text
    return item


def basic_text_sr(study_uid: str, patient_id: str, accession: str, findings: str, impression: str,
                  content_time: str = "120000", history: str = "") -> Dataset:
    """A Basic Text SR report: a titled container with Findings and Impression TEXT items."""
    ds = _base(BasicTextSRStorage, study_uid, patient_id, accession, "SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate = "20240105"
    ds.ContentTime = content_time
    items = [_text_item("59776-5", "Findings", findings), _text_item("19005-8", "Impression", impression)]
    if history:
        items.insert(0, _text_item("11329-0", "History", history))
    ds.ContentSequence = Sequence(items)
    return ds


def save(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
