"""Study Root C-FIND matching over the catalog (PS3.4 C.2.2.2), shared by C-FIND, C-MOVE and C-GET.

Supported per key: universal (empty), single value, wildcard (* and ?), UID list (backslash) and
date/time range (A-B, -B, A-). Keys the node does not hold are returned empty.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Select, and_, distinct, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, joinedload

from dicom_node.errors import NodeError
from indexer.schema import Instance, Series, Study

LEVELS = ("STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class Key:
    level: str
    column: InstrumentedAttribute[Any]
    kind: str  # "uid", "text", "date", "time"


KEYS: dict[str, Key] = {
    "StudyInstanceUID": Key("STUDY", Study.study_uid, "uid"),
    "PatientID": Key("STUDY", Study.patient_id, "text"),
    "PatientName": Key("STUDY", Study.patient_name, "text"),
    "PatientBirthDate": Key("STUDY", Study.patient_birth_date, "date"),
    "PatientSex": Key("STUDY", Study.patient_sex, "text"),
    "AccessionNumber": Key("STUDY", Study.accession_number, "text"),
    "StudyDate": Key("STUDY", Study.study_date, "date"),
    "StudyTime": Key("STUDY", Study.study_time, "time"),
    "StudyDescription": Key("STUDY", Study.study_description, "text"),
    "StudyID": Key("STUDY", Study.study_id, "text"),
    "ReferringPhysicianName": Key("STUDY", Study.referring_physician, "text"),
    "SeriesInstanceUID": Key("SERIES", Series.series_uid, "uid"),
    "Modality": Key("SERIES", Series.modality, "text"),
    "SeriesNumber": Key("SERIES", Series.series_number, "text"),
    "SeriesDescription": Key("SERIES", Series.series_description, "text"),
    "BodyPartExamined": Key("SERIES", Series.body_part, "text"),
    "SOPInstanceUID": Key("IMAGE", Instance.sop_uid, "uid"),
    "SOPClassUID": Key("IMAGE", Instance.sop_class_uid, "uid"),
    "InstanceNumber": Key("IMAGE", Instance.instance_number, "text"),
}
MODEL_OF_LEVEL = {"STUDY": Study, "SERIES": Series, "IMAGE": Instance}


def query_level(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise NodeError(f"QueryRetrieveLevel must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _condition(key: Key, value: str) -> Any:
    column = key.column
    if key.kind == "uid":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        return column.in_(uids) if len(uids) > 1 else column == uids[0]
    if key.kind in ("date", "time") and "-" in value:
        low, _, high = value.partition("-")
        low, high = low.strip().replace(":", ""), high.strip().replace(":", "")
        if key.kind == "time" and high:
            high = high.ljust(6, "9")  # 1200 matches up to 120099.999...
        parts = ([column >= low] if low else []) + ([column <= high] if high else [])
        return and_(*parts)
    if "*" in value or "?" in value:
        return column.like(_like(value), escape="\\")
    return column == value


def _value(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def build_query(identifier: Dataset, level: str) -> Select[Any]:
    """A SELECT of the rows at ``level`` that match every non-empty key at or above it."""
    depth = LEVELS.index(level)
    stmt = select(MODEL_OF_LEVEL[level])
    if level == "SERIES":
        stmt = stmt.join(Study, Series.study_pk == Study.id)
    elif level == "IMAGE":
        stmt = stmt.join(Series, Instance.series_pk == Series.id).join(Study, Series.study_pk == Study.id)
    for keyword, key in KEYS.items():
        if LEVELS.index(key.level) > depth or keyword not in identifier:
            continue
        value = _value(identifier, keyword)
        if value and value != "*":
            stmt = stmt.where(_condition(key, value))
    modalities = _value(identifier, "ModalitiesInStudy")
    if modalities and modalities != "*":
        wanted = [m for m in modalities.split("\\") if m]
        stmt = stmt.where(
            (Study.id if depth == 0 else Series.study_pk).in_(select(Series.study_pk).where(Series.modality.in_(wanted)))
        )
    return stmt.order_by(MODEL_OF_LEVEL[level].id)


def study_summary(session: Session, study_pks: list[int]) -> dict[int, tuple[str, int, int]]:
    """(modalities joined by backslash, number of series, number of instances) per study."""
    rows = session.execute(
        select(
            Series.study_pk,
            func.group_concat(distinct(Series.modality)) if session.bind.dialect.name == "sqlite"
            else func.string_agg(distinct(Series.modality), ","),
            func.count(distinct(Series.id)),
            func.count(Instance.id),
        )
        .join(Instance, Instance.series_pk == Series.id, isouter=True)
        .where(Series.study_pk.in_(study_pks))
        .group_by(Series.study_pk)
    )
    return {pk: ("\\".join(sorted(filter(None, (mods or "").split(",")))), n_series, n_inst)
            for pk, mods, n_series, n_inst in rows}


def matching_instances(session: Session, identifier: Dataset) -> list[tuple[str, str, str, str]]:
    """(SOP Instance UID, path, SOP Class UID, transfer syntax) of every instance under what ``identifier``
    matches."""
    level = query_level(identifier)
    matched = build_query(identifier, level).with_only_columns(MODEL_OF_LEVEL[level].id).order_by(None)
    stmt = select(Instance.sop_uid, Instance.path, Instance.sop_class_uid, Instance.transfer_syntax).join(
        Series, Instance.series_pk == Series.id
    )
    if level == "STUDY":
        stmt = stmt.where(Series.study_pk.in_(matched))
    elif level == "SERIES":
        stmt = stmt.where(Series.id.in_(matched))
    else:
        stmt = stmt.where(Instance.id.in_(matched))
    return [tuple(row) for row in session.execute(stmt.order_by(Series.id, Instance.id))]


def iter_matches(session: Session, identifier: Dataset, level: str, limit: int | None = None,
                 offset: int = 0) -> Iterator[Any]:
    """Each matching row at ``level`` (``limit`` of them after the first ``offset``), streamed so that a broad
    query does not load everything."""
    stmt = build_query(identifier, level).offset(offset).limit(limit)
    if level == "SERIES":
        stmt = stmt.options(joinedload(Series.study))
    elif level == "IMAGE":
        stmt = stmt.options(joinedload(Instance.series).joinedload(Series.study))
    yield from session.scalars(stmt.execution_options(yield_per=500))
