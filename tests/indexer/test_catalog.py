"""The catalog on a real SQLite database: duplicates, conflicts, report amendments, embedding state."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from indexer.catalog import (
    _STUDY_AND_SERIES,
    AddOutcome,
    Catalog,
    InstanceAttrs,
    ReportAttrs,
    SeriesAttrs,
    StudyAttrs,
    _DriverLookup,
)
from indexer.errors import IndexerError
from indexer.schema import CatalogFact, Instance, Kind, Report, Study


@pytest.fixture()
def catalog(tmp_path: Path) -> Catalog:
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    yield cat
    cat.close()


def instance(sop: str, kind: Kind = Kind.IMAGE) -> InstanceAttrs:
    return InstanceAttrs(sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax="1.2.840.10008.1.2.1",
                         path=f"x/{sop}.dcm", size_bytes=10, kind=kind)


def add(catalog: Catalog, study: str, sop: str, series: str = "", report: ReportAttrs | None = None) -> AddOutcome:
    kind = Kind.REPORT if report else Kind.IMAGE
    return catalog.add_instance(StudyAttrs(study, patient_id="P"), SeriesAttrs(series or f"{study}.1"),
                                instance(sop, kind), report)


def test_sqlite_runs_in_wal_mode(catalog: Catalog) -> None:
    with catalog.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_duplicate_and_conflict(catalog: Catalog) -> None:
    assert add(catalog, "1.1", "1.1.1.1") is AddOutcome.STORED
    assert catalog.find_instance_study("1.1.1.1") == "1.1"
    assert add(catalog, "1.1", "1.1.1.1") is AddOutcome.DUPLICATE  # the unique constraint decides races
    assert add(catalog, "1.2", "1.1.1.1") is AddOutcome.CONFLICT
    assert len(catalog.pending_images(10)) == 1


def test_a_series_of_another_study_is_refused(catalog: Catalog) -> None:
    assert add(catalog, "1.1", "1.1.1.1", series="9.9") is AddOutcome.STORED
    with pytest.raises(IndexerError, match="already belongs to another study"):
        add(catalog, "1.2", "1.2.1.1", series="9.9")
    assert catalog.find_instance_study("1.2.1.1") is None and catalog.find_instance_study("1.1.1.1") == "1.1"


class RecordingDriver:
    """A DBAPI connection that records what its cursor is asked to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def cursor(self) -> RecordingDriver:
        return self

    def execute(self, sql: str, params: object) -> None:
        self.calls.append((sql, params))

    def fetchone(self) -> tuple[None, None, None, bool]:
        return None, None, None, False

    def close(self) -> None:
        pass


@pytest.mark.parametrize("dialect", [sqlite.pysqlite.dialect(), postgresql.psycopg2.dialect(),
                                     postgresql.psycopg.dialect(), postgresql.pg8000.dialect()],
                         ids=lambda dialect: dialect.driver)
def test_driver_lookups_pass_each_paramstyle_its_parameters(dialect: Dialect) -> None:
    """The receive path's look-ups run on the driver's cursor (no PostgreSQL server here): a named paramstyle gets
    every parameter by name, a positional one one value per placeholder, the statement's own literals included."""
    driver = RecordingDriver()
    _DriverLookup(_STUDY_AND_SERIES, dialect).row(driver, uid="1.5", series_uid="1.5.1", accession="ACC")
    ((sql, params),) = driver.calls
    if isinstance(params, dict):
        assert {params[name] for name in ("uid", "series_uid", "accession")} == {"1.5", "1.5.1", "ACC"}
        assert all(f"%({name})s" in sql for name in params)
    else:
        placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
        assert sql.count(placeholder) == len(params) == 8
        assert params[:4] == ("1.5", "1.5.1", "1.5.1", "1.5") and params[5] == params[7] == "ACC"


def test_a_new_study_inserted_by_another_process_meanwhile_is_joined(catalog: Catalog, tmp_path: Path) -> None:
    """Two instances of one new study stored at once by two processes (the node and a receiver): the second one's
    look-up finds no study, the first commits it, the second's insert then fails on the unique UID; it is stored
    on a second try, in the same study and series."""
    other = Catalog(catalog.url)  # another engine, as another process has
    raced: list[str] = []

    @event.listens_for(catalog.engine, "before_cursor_execute")
    def meanwhile(connection: object, cursor: object, statement: str, *args: object) -> None:
        if statement.startswith("INSERT INTO studies") and not raced:
            raced.append(statement)
            assert add(other, "1.5", "1.5.1.1") is AddOutcome.STORED

    try:
        assert add(catalog, "1.5", "1.5.1.2") is AddOutcome.STORED
    finally:
        event.remove(catalog.engine, "before_cursor_execute", meanwhile)
        other.close()
    assert raced
    with catalog.session() as session:
        (study,) = session.query(Study).all()
        assert sorted(i.sop_uid for series in study.series for i in series.instances) == ["1.5.1.1", "1.5.1.2"]


def test_newer_report_replaces_older_and_late_older_does_not(catalog: Catalog) -> None:
    add(catalog, "1.1", "9.1", report=ReportAttrs("first", "20240101100000"))
    add(catalog, "1.1", "9.2", report=ReportAttrs("amended", "20240101120000"))
    add(catalog, "1.1", "9.3", report=ReportAttrs("late copy of an older one", "20240101110000"))
    pending = catalog.pending_reports(10)
    assert [p.payload for p in pending] == ["amended"]
    with catalog.session() as session:
        current = [r.text for r in session.query(Report).filter(Report.current.is_(True))]
    assert current == ["amended"]


def test_results_mark_studies_dirty_and_study_vectors_get_sequence_numbers(catalog: Catalog) -> None:
    add(catalog, "1.1", "1.1.1.1")
    add(catalog, "1.1", "1.1.1.2")
    add(catalog, "1.2", "1.2.1.1")
    items = catalog.pending_images(10)
    vectors = {items[0].id: np.ones(4, np.float32), items[1].id: np.full(4, 3, np.float32)}
    catalog.save_results(Instance, vectors, {items[2].id: "ModelError: cannot decode"},
                         {items[0].study_pk, items[1].study_pk})
    assert catalog.state_counts() == {"image.indexed": 2, "image.failed": 1}
    dirty = catalog.dirty_studies(10)
    assert dirty == [items[0].study_pk]
    images, report = catalog.study_inputs(dirty)[dirty[0]]
    assert len(images) == 2 and report is None
    seq = catalog.set_study_vectors({dirty[0]: (np.full(4, 2, np.float32), np.zeros(14, np.float32))}, "v1", dirty)
    assert catalog.dirty_studies(10) == []
    (pks, matrix), = list(catalog.study_vectors(after_seq=0))
    assert pks.tolist() == dirty and matrix[0].tolist() == [2, 2, 2, 2]
    assert list(catalog.study_vectors(after_seq=seq)) == []


def test_study_vectors_of_an_older_rule_are_rebuilt_once(tmp_path: Path) -> None:
    """A catalog written before study vectors were built from unit vectors (no rule recorded) gets every study
    vector marked for the embedding job to rebuild, once; a catalog that records the current rule is left alone."""
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    catalog = Catalog(url)
    add(catalog, "1.1", "1.1.1.1")
    add(catalog, "1.2", "1.2.1.1")
    with catalog.session() as session:
        session.query(Study).filter_by(study_uid="1.1").one().vector = np.ones(4, np.float32).tobytes()
        session.query(CatalogFact).delete()  # as an older version left it
        session.commit()
    assert catalog.dirty_studies(10) == []
    catalog.close()
    reopened = Catalog(url)
    with reopened.session() as session:
        dirty = [s.study_uid for s in session.query(Study).filter_by(dirty=True)]
    assert dirty == ["1.1"]  # the study without a vector has nothing to rebuild
    with reopened.session() as session:  # the embedding job has rebuilt it
        session.query(Study).update({"dirty": False})
        session.commit()
    reopened.close()
    again = Catalog(url)
    assert again.dirty_studies(10) == []
    again.close()
