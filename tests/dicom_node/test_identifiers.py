"""Answer identifiers built from already-encoded text (dicom_node/identifiers.py) are written as the bytes pydicom
would write for the same values, in each uncompressed transfer syntax a C-FIND may be answered in, whether
`encode_identifier` writes them itself (text keys, little endian) or leaves them to pydicom, and read back as the
values the catalog held."""
from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.dsutils import decode, encode

from dicom_node.identifiers import RESPONSE_CHARSET, answer_dataset, encode_identifier, response, text_element

SYNTAXES = {"implicit-le": ImplicitVRLittleEndian, "explicit-le": ExplicitVRLittleEndian,
            "explicit-be": ExplicitVRBigEndian, "deflated": DeflatedExplicitVRLittleEndian}


def request(text_only: bool = False) -> Dataset:
    """An IMAGE-level request; with ``text_only``, without its one key of another VR than text."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.PatientName = ""
    ds.StudyInstanceUID = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfStudyRelatedInstances = ""
    ds.StudyDescription = ""
    ds.AccessionNumber = ""
    if not text_only:
        ds.Rows = None  # not text: set as a pydicom value
    ds.add(DataElement(0x00990010, "LO", "A PRIVATE CREATOR"))  # private keys are not answered
    return ds


VALUES = {"PatientName": "Müller^Jürgen", "StudyInstanceUID": "1.2.3.456", "ModalitiesInStudy": ["CR", "DX"],
          "NumberOfStudyRelatedInstances": 3, "StudyDescription": "", "AccessionNumber": None, "Rows": 2048}


def by_pydicom(text_only: bool = False) -> Dataset:
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
    if not text_only:
        ds.Rows = 2048
    return ds


def written(identifier: Dataset, syntax: UID) -> bytes:
    return encode(identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)


@pytest.mark.parametrize("text_only", [True, False], ids=["text-keys", "a-number-key"])
@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
def test_answer_bytes_are_pydicoms(syntax: UID, text_only: bool) -> None:
    answer = response(request(text_only), "IMAGE", VALUES, "MMDL_NODE")
    assert encode_identifier(answer, syntax) == written(by_pydicom(text_only), syntax)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=["implicit", "explicit"])
def test_text_answers_are_written_without_pydicom(syntax: UID, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparisons above test the node's own writer: a text-only little endian answer never reaches pydicom's."""
    def refuse(*args: object) -> None:
        raise AssertionError("written by pydicom")

    monkeypatch.setattr("dicom_node.identifiers.encode", refuse)
    answer = response(request(text_only=True), "IMAGE", VALUES, "MMDL_NODE")
    assert encode_identifier(answer, syntax) == written(by_pydicom(text_only=True), syntax)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=["implicit", "explicit"])
def test_raw_text_that_pydicom_would_change_is_left_to_it(syntax: UID) -> None:
    """Raw text without the response character set (pydicom re-encodes it) and a group length (pydicom leaves it
    out): written as pydicom writes them."""
    no_charset = answer_dataset([text_element(0x00100010, "PN", "Müller^Jürgen"), text_element(0x00080050, "SH", "A1")])
    group_length = response(request(text_only=True), "IMAGE", VALUES, "MMDL_NODE", [text_element(0x00100000, "LO", "x")])
    for identifier in (no_charset, group_length):
        assert encode_identifier(identifier, syntax) == written(identifier, syntax)


@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
@pytest.mark.filterwarnings("ignore:The value:UserWarning")  # pydicom's, on the LT value too long for its VR
def test_long_text_is_written_as_pydicom_writes_it(syntax: UID) -> None:
    """Text VRs with a 4-byte length in explicit VR (UR, UT), and an LT value too long for its 2-byte one, which
    pydicom writes as UN: so does `encode_identifier`."""
    extra = [text_element(0x00081190, "UR", "http://node/studies/1"), text_element(0x0040A160, "UT", "x" * 70001),
             text_element(0x00204000, "LT", "y" * 70001)]
    answer = response(request(text_only=True), "IMAGE", VALUES, "MMDL_NODE", extra)
    expected = by_pydicom(text_only=True)
    expected.RetrieveURL = "http://node/studies/1"
    expected.TextValue = "x" * 70001
    expected.ImageComments = "y" * 70001
    assert encode_identifier(answer, syntax) == written(expected, syntax)


@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
def test_answer_reads_back_as_the_values_held(syntax: UID) -> None:
    """Whatever encoding it was declared in, an answer written in another one is still right."""
    answer = response(request(), "IMAGE", VALUES, "MMDL_NODE")
    read = decode(BytesIO(encode_identifier(answer, syntax)), syntax.is_implicit_VR, syntax.is_little_endian,
                  syntax.is_deflated)
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
    answer = response(ask, "IMAGE", VALUES, "MMDL_NODE")
    read = decode(BytesIO(encode_identifier(answer, syntax)), syntax.is_implicit_VR, syntax.is_little_endian,
                  syntax.is_deflated)
    assert 0x00280106 in read and str(read.PatientName) == "Müller^Jürgen"
