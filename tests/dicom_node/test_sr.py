"""Report text comes from the SR content tree: Findings and Impression, not history."""
from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.sr import report_text, report_time
from tests.dicom_node.builders import basic_text_sr


def test_findings_and_impression_are_taken_history_left_out() -> None:
    sr = basic_text_sr("1.2.3", "P1", "A1", "Heart size is enlarged.", "Cardiomegaly.",
                       history="Shortness of breath, rule out pneumonia.")
    assert report_text(sr) == "Heart size is enlarged.\nCardiomegaly."


def test_nested_sections_and_dcm_codes() -> None:
    sr = basic_text_sr("1.2.3", "P1", "A1", "x", "y")
    section = Dataset()
    section.ValueType = "CONTAINER"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121070", "DCM", "Findings"
    section.ConceptNameCodeSequence = Sequence([code])
    inner = Dataset()
    inner.ValueType = "TEXT"
    other = Dataset()
    other.CodeValue, other.CodingSchemeDesignator, other.CodeMeaning = "121071", "DCM", "Finding"
    inner.ConceptNameCodeSequence = Sequence([other])
    inner.TextValue = "Small left pleural effusion."
    section.ContentSequence = Sequence([inner])
    sr.ContentSequence = Sequence([section])
    assert report_text(sr) == "Small left pleural effusion."


def test_report_without_sections_falls_back_to_its_text() -> None:
    sr = basic_text_sr("1.2.3", "P1", "A1", "a", "b")
    for item in sr.ContentSequence:
        item.ConceptNameCodeSequence[0].CodeValue = "99999"
        item.ConceptNameCodeSequence[0].CodeMeaning = "Report"
    assert report_text(sr) == "a\nb"


def test_report_time_orders_amendments() -> None:
    early = basic_text_sr("1.2.3", "P1", "A1", "a", "b", content_time="0905")
    late = basic_text_sr("1.2.3", "P1", "A1", "a", "b", content_time="101500.25")
    assert report_time(early) == "20240105090500"
    assert report_time(early) < report_time(late)
