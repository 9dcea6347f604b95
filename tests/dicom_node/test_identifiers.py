"""Answer identifiers built from already-encoded text (dicom_node/identifiers.py) are the bytes pydicom would
write for the same values, in each uncompressed transfer syntax a C-FIND may be answered in, and read back as
the values the catalog held."""
from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode

from dicom_node.identifiers import RESPONSE_CHARSET, for_syntax, response

SYNTAXES = {"implicit-le": ImplicitVRLittleEndian, "explicit-le": ExplicitVRLittleEndian,
            "explicit-be": ExplicitVRBigEndian}


def request() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.PatientName = ""
    ds.StudyInstanceUID = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    ds.StudyDescription = ""
    ds.AccessionNumber = ""
    ds.Rows = None  # not text: set as a pydicom value
    ds.add(DataElement(0x00990010, "LO", "A PRIVATE CREATOR"))  # private keys are not answered
    return ds


VALUES = {"PatientName": "Müller^Jürgen", "StudyInstanceUID": "1.2.3.456", "ModalitiesInStudy": ["CR", "DX"],
          "NumberOfStudyRelatedInstances": 3, "StudyDescription": "", "AccessionNumber": None, "Rows": 2048}


def by_pydicom() -> Dataset:
    """The same answer set value by value through pydicom."""
    ds = Dataset()
    ds.SpecificCharacterSet = RESPONSE_CHARSET
    ds.QueryRetrieveLevel = "IMAGE"
    ds.RetrieveAETitle = "MMDL_NODE"
    ds.PatientName = VALUES["PatientName"]
    ds.StudyInstanceUID = VALUES["StudyInstanceUID"]
    ds.ModalitiesInStudy = VALUES["ModalitiesInStudy"]
    ds.NumberOfStudyRelatedInstances = VALUES["NumberOfStudyRelatedInstances"]
    ds.StudyDescription = None
    ds.AccessionNumber = None
    ds.Rows = 2048
    return ds


def written(identifier: Dataset, syntax: UID) -> bytes:
    return encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian)


@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
def test_answer_bytes_are_pydicoms(syntax: UID) -> None:
    answer = for_syntax(response(request(), "IMAGE", VALUES, "MMDL_NODE"), syntax)
    assert written(answer, syntax) == written(by_pydicom(), syntax)


@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
def test_answer_reads_back_as_the_values_held(syntax: UID) -> None:
    """Whatever encoding it was declared in, an answer written in another one is still right."""
    answer = response(request(), "IMAGE", VALUES, "MMDL_NODE")
    read = decode(BytesIO(written(answer, syntax)), syntax.is_implicit_VR, syntax.is_little_endian)
    assert str(read.PatientName) == "Müller^Jürgen"
    assert read.StudyInstanceUID == "1.2.3.456"
    assert list(read.ModalitiesInStudy) == ["CR", "DX"]
    assert read.NumberOfStudyRelatedInstances == 3
    assert read.StudyDescription == "" and read.AccessionNumber == ""
    assert read.Rows == 2048
    assert read.RetrieveAETitle == "MMDL_NODE" and read.QueryRetrieveLevel == "IMAGE"
    assert 0x00990010 not in read


@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
def test_a_key_whose_vr_depends_on_others_is_still_written(syntax: UID) -> None:
    """SmallestImagePixelValue is US or SS (by PixelRepresentation): pydicom resolves it, raw text or not."""
    ask = request()
    ask.add(DataElement(0x00280106, "US or SS", None))
    answer = for_syntax(response(ask, "IMAGE", VALUES, "MMDL_NODE"), syntax)
    read = decode(BytesIO(written(answer, syntax)), syntax.is_implicit_VR, syntax.is_little_endian)
    assert 0x00280106 in read and str(read.PatientName) == "Müller^Jürgen"
