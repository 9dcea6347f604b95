"""Reports joined to their study by UID or accession number, held when the study has not arrived yet."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from indexer.catalog import Catalog, InstanceAttrs, ReportAttrs, ReportOutcome, SeriesAttrs, StudyAttrs
from indexer.schema import HeldReport, Kind, Report, State


@pytest.fixture()
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    yield cat
    cat.close()


def store_image(catalog: Catalog, study_uid: str, accession: str = "", sop: str = "") -> None:
    catalog.add_instance(
        StudyAttrs(study_uid, patient_id="P", accession_number=accession), SeriesAttrs(f"{study_uid}.1"),
        InstanceAttrs(sop_uid=sop or f"{study_uid}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                      transfer_syntax="1.2.840.10008.1.2.1", path="x.dcm", size_bytes=1, kind=Kind.IMAGE))


def reports(catalog: Catalog) -> list[tuple[str, bool, State]]:
    with catalog.session() as session:
        return [(r.source_uid, r.current, r.state) for r in session.scalars(select(Report).order_by(Report.id))]


def hl7(text: str, time: str) -> ReportAttrs:
    return ReportAttrs(text=text, report_time=time, source="hl7")


def test_report_after_study_attaches_by_uid_and_by_accession(catalog: Catalog) -> None:
    store_image(catalog, "1.1", accession="ACC1")
    assert catalog.add_report("1.1", "", "hl7:a", hl7("one", "20240101000000")) is ReportOutcome.ATTACHED
    assert catalog.add_report("", "ACC1", "hl7:b", hl7("two", "20240102000000")) is ReportOutcome.ATTACHED
    assert reports(catalog) == [("hl7:a", False, State.SKIPPED), ("hl7:b", True, State.PENDING)]


def test_report_before_study_is_held_then_joined_in_the_same_transaction(catalog: Catalog) -> None:
    assert catalog.add_report("", "ACC9", "hl7:late", hl7("newer", "20240105000000")) is ReportOutcome.HELD
    assert catalog.add_report("", "ACC9", "hl7:early", hl7("older", "20240101000000")) is ReportOutcome.HELD
    assert catalog.add_report("2.2", "", "hl7:uid", hl7("other study", "20240101000000")) is ReportOutcome.HELD
    assert reports(catalog) == [] and catalog.held_report_count() == 3
    store_image(catalog, "9.9", accession="ACC9")
    # both join; the newer one is current whatever the order they were held in
    assert sorted(reports(catalog)) == [("hl7:early", False, State.SKIPPED), ("hl7:late", True, State.PENDING)]
    assert catalog.held_report_count() == 1
    store_image(catalog, "9.9", accession="ACC9", sop="9.9.1.2")  # a second image attaches nothing twice
    assert len(reports(catalog)) == 2
    store_image(catalog, "2.2")
    assert catalog.held_report_count() == 0 and len(reports(catalog)) == 3


def test_held_report_names_a_uid_so_another_study_with_its_accession_does_not_take_it(catalog: Catalog) -> None:
    catalog.add_report("3.3", "ACC3", "hl7:x", hl7("t", "20240101000000"))
    store_image(catalog, "4.4", accession="ACC3")
    assert catalog.held_report_count() == 1
    store_image(catalog, "3.3", accession="ACC3")
    assert catalog.held_report_count() == 0


def test_resent_message_changes_nothing(catalog: Catalog) -> None:
    assert catalog.add_report("", "ACC5", "hl7:m", hl7("t", "20240101000000")) is ReportOutcome.HELD
    assert catalog.add_report("", "ACC5", "hl7:m", hl7("t", "20240101000000")) is ReportOutcome.DUPLICATE
    store_image(catalog, "5.5", accession="ACC5")
    assert catalog.add_report("", "ACC5", "hl7:m", hl7("t", "20240101000000")) is ReportOutcome.DUPLICATE
    assert len(reports(catalog)) == 1


def test_a_failed_store_keeps_the_report_held(catalog: Catalog) -> None:
    catalog.add_report("6.6", "", "hl7:h", hl7("t", "20240101000000"))
    store_image(catalog, "7.7", sop="1.1.1")
    store_image(catalog, "6.6", sop="1.1.1")  # SOP UID held under another study: the transaction rolls back
    with catalog.session() as session:
        assert session.scalar(select(HeldReport.source_uid)) == "hl7:h"
    assert reports(catalog) == []


def test_a_report_needs_a_study_key(catalog: Catalog) -> None:
    with pytest.raises(ValueError, match="Study Instance UID or an Accession Number"):
        catalog.add_report("", "", "hl7:z", hl7("t", "20240101000000"))
