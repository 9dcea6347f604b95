"""The catalog's tables: studies, series, instances, reports, with their embedding state and vectors.

``QUERY_KEYS`` is the one list of the DICOM attributes the catalog holds per study, series and instance:
it makes their columns here, what the receive path records (``indexer.catalog``'s StudyAttrs, SeriesAttrs,
InstanceAttrs; ``dicom_node.ingest.key_values``), what C-FIND and QIDO match on (``indexer.matching``) and
the values they answer with. Adding a key to it is all that adding a C-FIND key takes; a catalog made
before the key was added gains its column when opened (``indexer.catalog``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Boolean, DateTime, Enum, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column, relationship

LEVELS = ("STUDY", "SERIES", "IMAGE")  # Study Root query levels, each table below the one before


@dataclass(frozen=True)
class QueryKey:
    """A DICOM attribute the catalog holds: where, how it matches, how long it may be."""

    level: str  # one of LEVELS: held in the studies, series or instances table
    column: str
    # How it matches (indexer.matching): "uid" one UID or a list; "text" a single value or a wildcard (* ?), case
    # included; "name" (PN) as text, except that a wildcard ignores case; "date", "time" a single value or a
    # range.
    kind: str
    max_length: int  # the column's size; a longer received value is cut to it
    index: bool = False
    unique: bool = False

    @property
    def required(self) -> bool:
        """UIDs name their row: a row is recorded with them or not at all. The other keys default to ""."""
        return self.kind == "uid"


QUERY_KEYS: dict[str, QueryKey] = {
    "StudyInstanceUID": QueryKey("STUDY", "study_uid", "uid", 64, unique=True),
    "PatientID": QueryKey("STUDY", "patient_id", "text", 64, index=True),
    "PatientName": QueryKey("STUDY", "patient_name", "name", 324),
    "PatientBirthDate": QueryKey("STUDY", "patient_birth_date", "date", 8),
    "PatientSex": QueryKey("STUDY", "patient_sex", "text", 16),
    "AccessionNumber": QueryKey("STUDY", "accession_number", "text", 16, index=True),
    "StudyDate": QueryKey("STUDY", "study_date", "date", 8, index=True),
    "StudyTime": QueryKey("STUDY", "study_time", "time", 16),
    "StudyDescription": QueryKey("STUDY", "study_description", "text", 64),
    "StudyID": QueryKey("STUDY", "study_id", "text", 16),
    "ReferringPhysicianName": QueryKey("STUDY", "referring_physician", "name", 324),
    "PatientAge": QueryKey("STUDY", "patient_age", "text", 4),
    "SeriesInstanceUID": QueryKey("SERIES", "series_uid", "uid", 64, unique=True),
    "Modality": QueryKey("SERIES", "modality", "text", 16, index=True),
    "SeriesNumber": QueryKey("SERIES", "series_number", "text", 12),
    "SeriesDescription": QueryKey("SERIES", "series_description", "text", 64),
    "BodyPartExamined": QueryKey("SERIES", "body_part", "text", 16),
    "SOPInstanceUID": QueryKey("IMAGE", "sop_uid", "uid", 64, unique=True),
    "SOPClassUID": QueryKey("IMAGE", "sop_class_uid", "uid", 64),
    "InstanceNumber": QueryKey("IMAGE", "instance_number", "text", 12),
}


_KEYS_OF_LEVEL = {level: {keyword: key for keyword, key in QUERY_KEYS.items() if key.level == level}
                  for level in LEVELS}
_KEYS_DOWN_TO = {level: tuple(keyword for keyword, key in QUERY_KEYS.items()
                              if LEVELS.index(key.level) <= LEVELS.index(level)) for level in LEVELS}


def keys_of_level(level: str) -> dict[str, QueryKey]:
    """The keys held in ``level``'s own table (one dict per level, made once: read it, do not change it)."""
    return _KEYS_OF_LEVEL[level]


def keys_down_to(level: str) -> tuple[str, ...]:
    """The keywords held at ``level`` and the levels above it."""
    return _KEYS_DOWN_TO[level]


def _key_columns(level: str) -> type:
    """A mixin with the columns of ``level``'s keys (declarative copies them into the mapped class)."""
    columns: dict[str, MappedColumn[Any]] = {
        key.column: mapped_column(String(key.max_length), nullable=False, index=key.index, unique=key.unique,
                                  default=None if key.required else "")
        for key in keys_of_level(level).values()
    }
    return type(f"{level.title()}Keys", (), columns)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class State(str, enum.Enum):
    """Where an instance or report stands in the embedding pipeline."""

    PENDING = "pending"
    INDEXED = "indexed"
    FAILED = "failed"
    SKIPPED = "skipped"  # stored and retrievable, but nothing to embed (e.g. an SR, a superseded report)


class Kind(str, enum.Enum):
    IMAGE = "image"
    REPORT = "report"
    SHEET = "sheet"  # the node's own reference sheet (a Secondary Capture it made): kept, never embedded


class Base(DeclarativeBase):
    pass


class Study(_key_columns("STUDY"), Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The study's point in the common space (float32 bytes), its predicted label probabilities
    # (float32 bytes, OBSERVATIONS order), and a monotonic sequence number so that an index
    # snapshot can be caught up with what changed after it.
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    label_scores: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    index_seq: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    model_version: Mapped[str] = mapped_column(String(64), default="")
    # Set in the same transaction that stores a new image/report vector; cleared when the study
    # vector is recomputed, so a crash between the two is caught up by the next run.
    dirty: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(_key_columns("SERIES"), Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(_key_columns("IMAGE"), Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the storage root
    size_bytes: Mapped[int] = mapped_column(Integer)
    kind: Mapped[Kind] = mapped_column(Enum(Kind, native_enum=False, length=16))
    state: Mapped[State] = mapped_column(Enum(State, native_enum=False, length=16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Report(Base):
    """A radiology report's text; the newest one of a study is ``current`` and is the one embedded."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_uid: Mapped[str] = mapped_column(String(128), unique=True)  # SR SOP Instance UID or HL7 message id
    source: Mapped[str] = mapped_column(String(8))  # "sr" or "hl7"
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    report_time: Mapped[str] = mapped_column(String(32), default="")  # YYYYMMDDHHMMSS[.ffffff], sortable
    text: Mapped[str] = mapped_column(Text)
    current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    state: Mapped[State] = mapped_column(Enum(State, native_enum=False, length=16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    vector: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HeldReport(Base):
    """A report whose study has not arrived yet; moved into ``reports`` when a study it names is stored."""

    __tablename__ = "held_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_uid: Mapped[str] = mapped_column(String(128), unique=True)
    source: Mapped[str] = mapped_column(String(8))
    study_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    report_time: Mapped[str] = mapped_column(String(32), default="")
    text: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CatalogFact(Base):
    """Facts about the catalog itself, e.g. the rule its study vectors were built by."""

    __tablename__ = "catalog_facts"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
