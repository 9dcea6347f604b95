"""C-FIND response identifiers: the requested keys, filled from catalog rows."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from dicom_node.matching import study_summary
from indexer.schema import Instance, Series, Study

RESPONSE_CHARSET = "ISO_IR 192"  # the catalog holds decoded text; answer in UTF-8


def study_values(study: Study, summary: tuple[str, int, int] | None) -> dict[str, Any]:
    values = {
        "StudyInstanceUID": study.study_uid,
        "PatientID": study.patient_id,
        "PatientName": study.patient_name,
        "PatientBirthDate": study.patient_birth_date,
        "PatientSex": study.patient_sex,
        "AccessionNumber": study.accession_number,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "StudyDescription": study.study_description,
        "StudyID": study.study_id,
        "ReferringPhysicianName": study.referring_physician,
    }
    if summary is not None:
        modalities, n_series, n_instances = summary
        values.update(
            ModalitiesInStudy=modalities.split("\\") if modalities else "",
            NumberOfStudyRelatedSeries=n_series,
            NumberOfStudyRelatedInstances=n_instances,
        )
    return values


def series_values(series: Series) -> dict[str, Any]:
    return {
        **study_values(series.study, None),
        "SeriesInstanceUID": series.series_uid,
        "Modality": series.modality,
        "SeriesNumber": series.series_number,
        "SeriesDescription": series.series_description,
        "BodyPartExamined": series.body_part,
    }


def instance_values(instance: Instance) -> dict[str, Any]:
    return {
        **series_values(instance.series),
        "SOPInstanceUID": instance.sop_uid,
        "SOPClassUID": instance.sop_class_uid,
        "InstanceNumber": instance.instance_number,
    }


def row_values(session: Session, level: str, rows: list[Any]) -> Iterator[dict[str, Any]]:
    """The values of matched catalog rows at ``level`` (studies with their modalities and counts)."""
    if level == "STUDY":
        summaries = study_summary(session, [row.id for row in rows])
        return (study_values(row, summaries.get(row.id)) for row in rows)
    if level == "SERIES":
        return (series_values(row) for row in rows)
    return (instance_values(row) for row in rows)


def response(request: Dataset, level: str, values: dict[str, Any], retrieve_ae: str) -> Dataset:
    """Every key the request named, with the held value or empty; plus level, charset and where to retrieve."""
    identifier = Dataset()
    identifier.SpecificCharacterSet = RESPONSE_CHARSET
    identifier.QueryRetrieveLevel = level
    for element in request:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        value = values.get(keyword)
        if value in (None, ""):
            identifier[element.tag] = DataElement(element.tag, element.VR, None)
        else:
            setattr(identifier, keyword, value)
    identifier.RetrieveAETitle = retrieve_ae
    return identifier
