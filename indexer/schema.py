"""The catalog's tables: studies, series, instances, reports, with their embedding state and vectors."""
from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import Boolean, DateTime, Enum, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


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


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    referring_physician: Mapped[str] = mapped_column(String(324), default="")
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


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[str] = mapped_column(String(12), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part: Mapped[str] = mapped_column(String(16), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    instance_number: Mapped[str] = mapped_column(String(12), default="")
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
