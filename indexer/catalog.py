"""The catalog: what the node holds (studies, series, instances, reports), their embedding state and vectors.

The node reads and writes it through ``Catalog``'s methods only, C-FIND matching included; ``session``
and ``engine`` are open for the synthetic bulk load (``bench populate``) and for tests. Any SQLAlchemy URL
works; SQLite runs in WAL mode with full synchronous commits, so a committed row survives a crash (the
node answers C-STORE success only after that commit).
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, make_dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    bindparam,
    create_engine,
    delete,
    distinct,
    event,
    exists,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateColumn

from indexer.errors import IndexerError
from indexer.matching import MODEL_OF_LEVEL, build_query, instances_query
from indexer.schema import (
    QUERY_KEYS,
    Base,
    CatalogFact,
    HeldReport,
    Instance,
    Kind,
    Report,
    Series,
    State,
    Study,
    keys_of_level,
)
from models.study import STUDY_VECTOR_RULE

LOG = logging.getLogger(__name__)

# A study's row as `find_study` and `studies` read it: its columns as attributes, named as Study's.
StudyRow = Row[Any]

# Statements of the receive path, built once so that a received instance pays only for executing them.
_STUDY_PK = select(Study.id).where(Study.study_uid == bindparam("uid"))
_INSTANCE_STUDY_UID = (select(Study.study_uid).join(Series, Series.study_pk == Study.id)
                       .join(Instance, Instance.series_pk == Series.id).where(Instance.sop_uid == bindparam("uid")))
# Held reports that name a study: by its UID, or by its accession number when they name no UID.
_HELD_NAMING_STUDY = or_(HeldReport.study_uid == bindparam("uid"),
                         (HeldReport.study_uid == "") & (bindparam("accession") != "")
                         & (HeldReport.accession_number == bindparam("accession")))
_HELD_FOR_STUDY = (
    select(HeldReport.id, HeldReport.source_uid, HeldReport.text, HeldReport.report_time, HeldReport.source)
    .where(_HELD_NAMING_STUDY).order_by(HeldReport.report_time, HeldReport.id)
)
_SERIES_NAMED = Series.series_uid == bindparam("series_uid")
# What add_instance needs to know before writing, in one round trip (NULL where absent): the study's key, the
# series' key and its study's, whether held reports name the study.
_STUDY_AND_SERIES = select(
    _STUDY_PK.scalar_subquery().label("study_pk"),
    select(Series.id).where(_SERIES_NAMED).scalar_subquery().label("series_pk"),
    select(Series.study_pk).where(_SERIES_NAMED).scalar_subquery().label("series_study_pk"),
    exists().where(_HELD_NAMING_STUDY).label("held_reports"),
)
_INSERT_STUDY = insert(Study).returning(Study.id)
_INSERT_SERIES = insert(Series).returning(Series.id)
_INSERT_INSTANCE = insert(Instance)

# Statements of the similar-case answer (C-FIND and HTTP), built once: building and caching a statement per
# call cost SQLAlchemy more CPU than SQLite took to run it. ``pks`` takes a list of primary keys. Studies are read
# as rows, not ORM objects: the ORM's session and identity map took twice the CPU of the same rows read plainly.
_PKS = bindparam("pks", expanding=True)
_STUDY_ROW = select(*Study.__table__.columns)
_STUDY_BY_UID = _STUDY_ROW.where(Study.study_uid == bindparam("uid"))
_STUDY_BY_ACCESSION = (_STUDY_ROW.where(Study.accession_number == bindparam("accession"))
                       .order_by(Study.id.desc()).limit(1))
_STUDIES = _STUDY_ROW.where(Study.id.in_(_PKS))
_STUDY_ANSWERS = build_query({}, "STUDY").where(Study.id.in_(_PKS))
_FIRST_IMAGES = (select(Series.study_pk, Instance.sop_uid, Instance.path)
                 .join(Series, Instance.series_pk == Series.id)
                 .where(Series.study_pk.in_(_PKS), Instance.kind == Kind.IMAGE)
                 .order_by((Instance.state != State.INDEXED), Instance.id))
_CURRENT_REPORTS = select(Report.study_pk, Report.text).where(Report.study_pk.in_(_PKS), Report.current.is_(True))


def _summaries_query(modalities: Any) -> Select[Any]:
    """Each study's joined modalities (by the dialect's aggregate ``modalities``), series and instance counts."""
    return (select(Series.study_pk, modalities, func.count(distinct(Series.id)), func.count(Instance.id))
            .join(Instance, Instance.series_pk == Series.id, isouter=True)
            .where(Series.study_pk.in_(_PKS))
            .group_by(Series.study_pk))


_SQLITE_SUMMARIES = _summaries_query(func.group_concat(distinct(Series.modality)))
_SUMMARIES = _summaries_query(func.string_agg(distinct(Series.modality), ","))


def _attrs(name: str, level: str, required: Sequence[tuple[str, type]] = (),
           optional: Sequence[tuple[str, type, Any]] = ()) -> type:
    """A frozen dataclass of what a received row at ``level`` records: the columns of the level's keys (its
    UIDs first and required, the others "" when absent), plus ``required`` and ``optional`` other fields."""
    keys = keys_of_level(level).values()
    return make_dataclass(name, [
        *((key.column, str) for key in keys if key.required),
        *required,
        *((key.column, str, field(default="")) for key in keys if not key.required),
        *optional,
    ], frozen=True, namespace={"__module__": __name__})


StudyAttrs = _attrs("StudyAttrs", "STUDY")
SeriesAttrs = _attrs("SeriesAttrs", "SERIES")
InstanceAttrs = _attrs("InstanceAttrs", "IMAGE", [("transfer_syntax", str), ("path", str), ("size_bytes", int),
                                                  ("kind", Kind)], [("calling_ae", str, field(default=""))])


@dataclass(frozen=True)
class ReportAttrs:
    """Report text and the time that orders amendments (YYYYMMDDHHMMSS, later wins)."""

    text: str
    report_time: str
    source: str = "sr"


class ReportOutcome(enum.Enum):
    ATTACHED = "attached"  # joined to its study (current, or kept as an older version)
    HELD = "held"  # its study is not here yet: kept, joined when the study arrives
    DUPLICATE = "duplicate"  # the same source id was received before: nothing changed


class AddOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same study: already held, nothing changed
    CONFLICT = "conflict"  # same SOP Instance UID, another study: refused


@dataclass(frozen=True)
class PendingItem:
    id: int
    study_pk: int
    payload: str  # image: path relative to storage; report: its text


def to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full fsync on commit, and a long busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _study_summaries(connection: Connection, study_pks: Sequence[int]) -> dict[int, dict[str, Any]]:
    """ModalitiesInStudy, NumberOfStudyRelatedSeries and NumberOfStudyRelatedInstances of each study with a series."""
    rows = connection.execute(_SQLITE_SUMMARIES if connection.dialect.name == "sqlite" else _SUMMARIES,
                              {"pks": list(study_pks)})
    summaries = {}
    for pk, joined, n_series, n_instances in rows:
        held = sorted(filter(None, (joined or "").split(",")))
        summaries[pk] = {"ModalitiesInStudy": held or "", "NumberOfStudyRelatedSeries": n_series,
                         "NumberOfStudyRelatedInstances": n_instances}
    return summaries


def _answer_values(connection: Connection, level: str, rows: Sequence[Row[Any]]) -> dict[int, dict[str, Any]]:
    """Per matched row (of ``indexer.matching.build_query``): the values of its keys by keyword, and at STUDY
    level the study's modalities and counts (when it has series)."""
    values = {}
    for row in rows:
        row_values = dict(row._mapping)
        values[row_values.pop("pk")] = row_values
    if level == "STUDY":
        for pk, summary in _study_summaries(connection, list(values)).items():
            values[pk].update(summary)
    return values


class _DriverLookup:
    """A SELECT of plain values (strings in; strings, integers or a flag out; at most one row) compiled once for a
    dialect and run on a DBAPI connection's own cursor. The receive path runs its two look-ups once per instance,
    and SQLAlchemy's execution layer cost them more CPU than the database did (find_instance_study took half the
    CPU without it, measured in the node); none of these values needs its type processing."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        self._compiled = statement.compile(dialect=dialect)
        self._sql = str(self._compiled)

    def row(self, dbapi_connection: Any, **values: str) -> tuple[Any, ...]:
        """The first row, () when none."""
        params = self._compiled.construct_params(values)  # with the statement's own literals
        cursor = dbapi_connection.cursor()
        try:
            if self._compiled.positional:
                cursor.execute(self._sql, tuple(params[name] for name in self._compiled.positiontup))
            else:
                cursor.execute(self._sql, params)
            return tuple(cursor.fetchone() or ())
        finally:
            cursor.close()


class Catalog:
    """What the node reads and writes in its catalog; each method is one transaction."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._instance_study = _DriverLookup(_INSTANCE_STUDY_UID, self.engine.dialect)
        self._study_and_series = _DriverLookup(_STUDY_AND_SERIES, self.engine.dialect)
        Base.metadata.create_all(self.engine)
        self._add_key_columns()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._follow_study_vector_rule()

    def _add_key_columns(self) -> None:
        """Add the columns (and their indexes) of QUERY_KEYS added since the catalog was made, empty for the
        rows already held; ``create_all`` makes only missing tables. (A new unique key would not get its
        constraint this way.)"""
        inspector = inspect(self.engine)
        held = {level: {column["name"] for column in inspector.get_columns(model.__tablename__)}
                for level, model in MODEL_OF_LEVEL.items()}
        missing = [MODEL_OF_LEVEL[key.level].__table__.c[key.column] for key in QUERY_KEYS.values()
                   if key.column not in held[key.level]]
        if not missing:
            return
        with self.engine.begin() as connection:
            for column in missing:
                connection.exec_driver_sql(f"ALTER TABLE {column.table.name} ADD COLUMN "
                                           f"{CreateColumn(column).compile(dialect=self.engine.dialect)} DEFAULT ''")
                for index in column.table.indexes:
                    if column.name in index.columns:
                        index.create(connection)
        LOG.warning("catalog columns added, empty for the rows already held: %s",
                    ", ".join(f"{column.table.name}.{column.name}" for column in missing))

    def _follow_study_vector_rule(self) -> None:
        """Study vectors built by another rule than ``models.study.study_vector``'s (a catalog of an older
        version) are marked for refresh: the embedding job rebuilds them from the stored vectors."""
        with self._sessions.begin() as session:
            fact = session.get(CatalogFact, "study_vector_rule")
            if fact is not None and fact.value == STUDY_VECTOR_RULE:
                return
            stale = session.execute(update(Study).where(Study.vector.is_not(None)).values(dirty=True)).rowcount
            session.merge(CatalogFact(key="study_vector_rule", value=STUDY_VECTOR_RULE))
        if stale:
            LOG.warning("%d study vectors were built by an older rule: rebuilt by the embedding job", stale)

    def close(self) -> None:
        self.engine.dispose()

    def reachable(self) -> bool:
        """Whether the database answers a trivial query (for the health check)."""
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            return True
        except Exception:  # any driver error means: not reachable now
            return False

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for bulk loading (``bench populate``) and for tests; the node itself uses the methods."""
        with self._sessions() as session:
            yield session

    # -- receiving -----------------------------------------------------------------------------
    def find_instance_study(self, sop_uid: str) -> str | None:
        """The StudyInstanceUID under which ``sop_uid`` is held, or None."""
        connection = self.engine.raw_connection()
        try:
            row = self._instance_study.row(connection, uid=sop_uid)
        finally:
            connection.close()  # back to the pool, which rolls it back
        return row[0] if row else None

    def add_instance(
        self,
        study: StudyAttrs,
        series: SeriesAttrs,
        instance: InstanceAttrs,
        report: ReportAttrs | None = None,
    ) -> AddOutcome:
        """Record a stored instance (and the report it carries) in one transaction.

        Core statements built once, on primary keys, no ORM objects, one look-up before the inserts: this runs
        once per received instance. (The attrs dataclasses hold plain values: ``vars`` is their row.) The look-up
        runs before the write transaction: when another association (or receiver process) inserts the same new
        study or series in between, the insert fails on its unique UID and the whole is tried once more."""
        retried = False
        while True:
            try:
                with self.engine.begin() as connection:
                    self._add_instance(connection, study, series, instance, report)
                return AddOutcome.STORED
            except IntegrityError:
                held_in = self.find_instance_study(instance.sop_uid)
                if held_in is not None:  # another association stored the same SOP Instance UID meanwhile
                    return AddOutcome.DUPLICATE if held_in == study.study_uid else AddOutcome.CONFLICT
                if retried:
                    raise
                retried = True

    def _add_instance(self, connection: Connection, study: StudyAttrs, series: SeriesAttrs, instance: InstanceAttrs,
                      report: ReportAttrs | None) -> None:
        study_pk, series_pk, series_study_pk, held_reports = self._study_and_series.row(
            connection.connection, uid=study.study_uid, series_uid=series.series_uid, accession=study.accession_number)
        if study_pk is None:
            study_pk = connection.scalar(_INSERT_STUDY, vars(study))
            if held_reports:
                self._attach_held(connection, study_pk, study.study_uid, study.accession_number)
        if series_pk is None:
            series_pk = connection.scalar(_INSERT_SERIES, {**vars(series), "study_pk": study_pk})
        elif series_study_pk != study_pk:
            raise IndexerError(
                f"series {series.series_uid} already belongs to another study; instance {instance.sop_uid} refused"
            )
        state = State.PENDING if instance.kind is Kind.IMAGE else State.SKIPPED
        connection.execute(_INSERT_INSTANCE, {**vars(instance), "series_pk": series_pk, "state": state})
        if report is not None:
            self._add_report(connection, study_pk, instance.sop_uid, report)

    def add_report(self, study_uid: str, accession_number: str, source_uid: str, report: ReportAttrs) -> ReportOutcome:
        """Join a report (e.g. from HL7) to the study named by UID, else by accession number; hold it if absent."""
        if not (study_uid or accession_number):
            raise ValueError("a report needs a Study Instance UID or an Accession Number")
        try:
            with self.engine.begin() as connection:
                for model in (Report, HeldReport):
                    if connection.scalar(select(model.id).where(model.source_uid == source_uid)) is not None:
                        return ReportOutcome.DUPLICATE
                if study_uid:
                    study_pk = connection.scalar(_STUDY_PK, {"uid": study_uid})
                else:
                    study_pk = connection.scalar(select(Study.id).where(Study.accession_number == accession_number)
                                                 .order_by(Study.id.desc()).limit(1))
                if study_pk is None:
                    connection.execute(insert(HeldReport).values(
                        source_uid=source_uid, source=report.source, study_uid=study_uid,
                        accession_number=accession_number, report_time=report.report_time, text=report.text))
                    return ReportOutcome.HELD
                self._add_report(connection, study_pk, source_uid, report)
        except IntegrityError:  # the same source id committed by another connection meanwhile
            return ReportOutcome.DUPLICATE
        return ReportOutcome.ATTACHED

    def _attach_held(self, connection: Connection, study_pk: int, study_uid: str, accession_number: str) -> None:
        """Move the held reports naming this new study (by UID, or by accession number without a UID) to it."""
        held = connection.execute(_HELD_FOR_STUDY, {"uid": study_uid, "accession": accession_number}).all()
        for row in held:
            self._add_report(connection, study_pk, row.source_uid,
                             ReportAttrs(text=row.text, report_time=row.report_time, source=row.source))
        if held:
            connection.execute(delete(HeldReport).where(HeldReport.id.in_([row.id for row in held])))

    def study_instance_count(self, study_uid: str) -> int:
        """How many instances of the study the node holds (0 when none)."""
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).select_from(Instance).join(Series, Instance.series_pk == Series.id)
                .join(Study, Series.study_pk == Study.id).where(Study.study_uid == study_uid)
            ) or 0

    def held_report_count(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(HeldReport)) or 0

    @staticmethod
    def _add_report(connection: Connection, study_pk: int, source_uid: str, report: ReportAttrs) -> None:
        newest = connection.execute(
            select(Report.id, Report.report_time, Report.state).where(Report.study_pk == study_pk, Report.current.is_(True))
        ).first()
        is_current = newest is None or report.report_time >= newest.report_time
        if is_current and newest is not None:
            superseded: dict[str, Any] = {"current": False}
            if newest.state is State.PENDING:
                superseded.update(state=State.SKIPPED, reason="superseded by a newer report")
            connection.execute(update(Report).where(Report.id == newest.id).values(superseded))
        connection.execute(insert(Report).values(
            source_uid=source_uid,
            source=report.source,
            study_pk=study_pk,
            report_time=report.report_time,
            text=report.text,
            current=is_current,
            state=State.PENDING if is_current else State.SKIPPED,
            reason="" if is_current else "a newer report of this study is already held",
        ))

    # -- the embedding job ---------------------------------------------------------------------
    def pending_images(self, limit: int) -> list[PendingItem]:
        with self._sessions() as session:
            rows = session.execute(
                select(Instance.id, Series.study_pk, Instance.path)
                .join(Series, Instance.series_pk == Series.id)
                .where(Instance.state == State.PENDING, Instance.kind == Kind.IMAGE)
                .order_by(Instance.id)
                .limit(limit)
            )
            return [PendingItem(*row) for row in rows]

    def pending_reports(self, limit: int) -> list[PendingItem]:
        with self._sessions() as session:
            rows = session.execute(
                select(Report.id, Report.study_pk, Report.text)
                .where(Report.state == State.PENDING)
                .order_by(Report.id)
                .limit(limit)
            )
            return [PendingItem(*row) for row in rows]

    def save_results(
        self,
        model: type[Instance] | type[Report],
        vectors: dict[int, np.ndarray],
        failures: dict[int, str],
        study_pks: set[int],
    ) -> None:
        """Store embedding results (vectors: indexed, reasons: failed) and mark their studies for refresh."""
        with self._sessions.begin() as session:
            if study_pks:
                session.execute(update(Study).where(Study.id.in_(study_pks)).values(dirty=True))
            for item_id, vector in vectors.items():
                session.execute(
                    update(model).where(model.id == item_id).values(
                        vector=to_blob(vector), state=State.INDEXED, reason=""
                    )
                )
            for item_id, reason in failures.items():
                session.execute(
                    update(model).where(model.id == item_id).values(state=State.FAILED, reason=reason[:2000])
                )

    def dirty_studies(self, limit: int) -> list[int]:
        with self._sessions() as session:
            return list(session.scalars(select(Study.id).where(Study.dirty.is_(True)).order_by(Study.id).limit(limit)))

    def study_inputs(self, study_pks: Sequence[int]) -> dict[int, tuple[list[np.ndarray], np.ndarray | None]]:
        """For each study: the vectors of its indexed images and of its current indexed report."""
        inputs: dict[int, tuple[list[np.ndarray], np.ndarray | None]] = {pk: ([], None) for pk in study_pks}
        with self._sessions() as session:
            images = session.execute(
                select(Series.study_pk, Instance.vector)
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.study_pk.in_(study_pks), Instance.state == State.INDEXED)
            )
            for study_pk, blob in images:
                inputs[study_pk][0].append(from_blob(blob))
            reports = session.execute(
                select(Report.study_pk, Report.vector).where(
                    Report.study_pk.in_(study_pks), Report.current.is_(True), Report.state == State.INDEXED
                )
            )
            for study_pk, blob in reports:
                inputs[study_pk] = (inputs[study_pk][0], from_blob(blob))
        return inputs

    def set_study_vectors(
        self, vectors: dict[int, tuple[np.ndarray, np.ndarray]], model_version: str, refreshed: Sequence[int]
    ) -> int:
        """Store each study's vector and label scores under a new sequence number; returns it.

        ``refreshed`` are all the studies looked at (some may have no vector yet): they are no longer dirty.
        """
        with self._sessions.begin() as session:
            session.execute(update(Study).where(Study.id.in_(list(refreshed))).values(dirty=False))
            seq = (session.scalar(select(func.max(Study.index_seq))) or 0) + 1
            for study_pk, (vector, scores) in vectors.items():
                session.execute(
                    update(Study).where(Study.id == study_pk).values(
                        vector=to_blob(vector),
                        label_scores=to_blob(scores),
                        index_seq=seq,
                        model_version=model_version,
                        dirty=False,
                    )
                )
        return seq

    def study_vectors(self, after_seq: int = 0, chunk: int = 10000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(study pks, vectors) in chunks, for studies whose vector changed after ``after_seq``. The pks are read
        first, through the index on ``index_seq``: a query ordered by pk makes SQLite walk the whole table (4 GB of
        vectors at 1M studies, ~9 s from a cold disk at every start) even when no study changed."""
        with self._sessions() as session:
            pks = sorted(session.scalars(select(Study.id).where(Study.index_seq > after_seq)))
        for start in range(0, len(pks), chunk):
            with self._sessions() as session:
                rows = session.execute(
                    select(Study.id, Study.vector)
                    .where(Study.id.in_(pks[start:start + chunk]), Study.vector.is_not(None))
                    .order_by(Study.id)
                ).all()
            if rows:
                yield np.array([r[0] for r in rows], dtype=np.int64), np.stack([from_blob(r[1]) for r in rows])

    def max_index_seq(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.max(Study.index_seq))) or 0

    # -- answering -----------------------------------------------------------------------------
    def matches(self, keys: Mapping[str, str], level: str, limit: int | None = None, offset: int = 0,
                batch: int = 100) -> Iterator[dict[str, Any]]:
        """The values (by keyword) of each row at ``level`` that ``keys`` match (``indexer.matching``), in the
        order they were recorded, ``limit`` of them after the first ``offset``: every key at or above the
        level and, at STUDY level, the study's modalities and counts. Read ``batch`` rows at a time, so that
        a broad query does not load everything."""
        stmt = build_query(keys, level).offset(offset).limit(limit).execution_options(yield_per=batch)
        with self.engine.connect() as connection:
            for rows in connection.execute(stmt).partitions():
                yield from _answer_values(connection, level, rows).values()

    def study_values(self, study_pks: Sequence[int]) -> dict[int, dict[str, Any]]:
        """What ``matches`` answers for each of these studies, by primary key."""
        with self.engine.connect() as connection:
            return _answer_values(connection, "STUDY", connection.execute(_STUDY_ANSWERS, {"pks": list(study_pks)}).all())

    def study_summaries(self, study_pks: Sequence[int]) -> dict[int, dict[str, Any]]:
        """ModalitiesInStudy, NumberOfStudyRelatedSeries and NumberOfStudyRelatedInstances of each of these studies
        that has a series, by primary key: what ``study_values`` adds to the study's row."""
        with self.engine.connect() as connection:
            return _study_summaries(connection, study_pks)

    def matching_instances(self, keys: Mapping[str, str], level: str) -> list[tuple[str, str, str, str]]:
        """(SOP Instance UID, path, SOP Class UID, transfer syntax) of every instance under the rows at
        ``level`` that ``keys`` match."""
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(instances_query(keys, level))]

    def find_study(self, study_uid: str = "", accession_number: str = "") -> StudyRow | None:
        """The study named by its UID, or else by its accession number (the most recent one)."""
        with self.engine.connect() as connection:
            if study_uid:
                return connection.execute(_STUDY_BY_UID, {"uid": study_uid}).first()
            return connection.execute(_STUDY_BY_ACCESSION, {"accession": accession_number}).first()

    def studies(self, pks: Sequence[int]) -> dict[int, StudyRow]:
        with self.engine.connect() as connection:
            return {row.id: row for row in connection.execute(_STUDIES, {"pks": list(pks)})}

    def held_syntaxes(self) -> list[tuple[str, str]]:
        """Each (SOP Class UID, transfer syntax) pair the node holds instances in (read once at start)."""
        with self._sessions() as session:
            return [tuple(row) for row in session.execute(
                select(Instance.sop_class_uid, Instance.transfer_syntax).distinct())]

    def first_images(self, study_pks: Sequence[int]) -> dict[int, tuple[str, str]]:
        """For each study that has one, (SOPInstanceUID, stored path) of the image that shows it: the first
        received of its embedded images, else of all its images (one not embedded yet, or failed)."""
        first: dict[int, tuple[str, str]] = {}
        with self.engine.connect() as connection:
            for study_pk, sop_uid, path in connection.execute(_FIRST_IMAGES, {"pks": list(study_pks)}):
                first.setdefault(study_pk, (sop_uid, path))
        return first

    def image_path(self, sop_uid: str) -> str | None:
        """The stored path (relative to storage) of an image instance, or None when no such image is held."""
        with self._sessions() as session:
            return session.scalar(select(Instance.path).where(Instance.sop_uid == sop_uid, Instance.kind == Kind.IMAGE))

    def instance_paths(self, study_pk: int, kinds: Sequence[Kind], indexed_only: bool = False) -> list[str]:
        """The stored paths of the study's instances of these kinds (only the embedded ones if ``indexed_only``),
        in the order received."""
        query = (select(Instance.path).join(Series, Instance.series_pk == Series.id)
                 .where(Series.study_pk == study_pk, Instance.kind.in_(kinds)).order_by(Instance.id))
        if indexed_only:
            query = query.where(Instance.state == State.INDEXED)
        with self._sessions() as session:
            return list(session.scalars(query))

    def held_instances(self, sop_uids: Sequence[str]) -> set[str]:
        """Which of these SOP Instance UIDs the node holds."""
        with self._sessions() as session:
            return set(session.scalars(select(Instance.sop_uid).where(Instance.sop_uid.in_(sop_uids))))

    def indexed_studies_since(self, since: datetime) -> list[str]:
        """The StudyInstanceUIDs of the received (not synthetic) studies with a vector, recorded at ``since`` or
        later, oldest first."""
        with self._sessions() as session:
            return list(session.scalars(
                select(Study.study_uid).where(Study.vector.is_not(None), Study.created_at >= since,
                                              Study.synthetic.is_(False)).order_by(Study.id)))

    def current_reports(self, study_pks: Sequence[int]) -> dict[int, str]:
        """The text of each study's current report (SR or HL7), for studies that have one."""
        with self.engine.connect() as connection:
            return dict(connection.execute(_CURRENT_REPORTS, {"pks": list(study_pks)}).all())

    def state_counts(self) -> dict[str, int]:
        """How many images and reports are in each state, e.g. {"image.pending": 3}."""
        counts: dict[str, int] = {}
        with self._sessions() as session:
            for kind, state, n in session.execute(
                select(Instance.kind, Instance.state, func.count()).group_by(Instance.kind, Instance.state)
            ):
                counts[f"{kind.value}.{state.value}"] = n
            for state, n in session.execute(select(Report.state, func.count()).group_by(Report.state)):
                counts[f"report_text.{state.value}"] = n
        return counts

    def received_by_caller(self) -> list[tuple[str, int, int]]:
        """(calling AE title, instances, bytes) of what each caller sent, all time."""
        with self._sessions() as session:
            return [(ae, count, size or 0) for ae, count, size in session.execute(
                select(Instance.calling_ae, func.count(), func.sum(Instance.size_bytes)).group_by(Instance.calling_ae))]

    def study_vector_count(self) -> int:
        """How many studies have a vector."""
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(Study).where(Study.vector.is_not(None)))
