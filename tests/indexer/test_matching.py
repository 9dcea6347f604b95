"""C-FIND matching in process, without sockets: datasets received through the real Ingestor, matched by the
catalog (indexer.matching over QUERY_KEYS), answered as C-FIND and QIDO identifiers. The over-the-wire tests
(tests/dicom_node/test_node.py, web/test_dicomweb.py) run the same matching through the DICOM and HTTP doors."""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy.dialects import postgresql
from starlette.datastructures import QueryParams

from dicom_node.identifiers import response
from dicom_node.ingest import Ingestor, key_values
from dicom_node.matching import matching_keys
from dicom_node.retrieve import HeldSyntaxes
from dicom_node.status import Status
from dicom_node.storage import FileStore
from dicom_node.web.dicomweb import parse_query
from indexer.catalog import Catalog
from indexer.matching import build_query
from indexer.schema import QUERY_KEYS
from tests.dicom_node.builders import ROOT, dx_synthetic


class Node:
    """A catalog and a store, fed through the Ingestor as C-STORE feeds them."""

    def __init__(self, folder: Path) -> None:
        self.url = f"sqlite:///{folder / 'catalog.sqlite3'}"
        self.catalog = Catalog(self.url)
        self.store = FileStore(folder / "store")
        self.ingestor = Ingestor(self.store, self.catalog, HeldSyntaxes([]), folder / "locks")

    def receive(self, study_uid: str, patient_id: str, accession: str, **attributes: str) -> Dataset:
        ds = dx_synthetic(study_uid, patient_id, accession, size=8)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        received = self.store.incoming / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(received, enforce_file_format=True)
        result = self.ingestor.ingest(ds, received, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), "TEST")
        assert result.status is Status.SUCCESS, result.comment
        return ds


STUDY_A, STUDY_B, STUDY_C = (generate_uid(prefix=ROOT) for _ in range(3))


@pytest.fixture()
def node(tmp_path: Path) -> Node:
    node = Node(tmp_path)
    node.receive(STUDY_A, "P1", "ACC1", PatientName="Doe^John", StudyDate="20240105", StudyTime="101500",
                 ReferringPhysicianName="Smith^Anna")
    node.receive(STUDY_A, "P1", "ACC1", PatientName="Doe^John", StudyDate="20240105", StudyTime="101500",
                 ReferringPhysicianName="Smith^Anna", Modality="CR")  # a second series of study A
    node.receive(STUDY_B, "P2", "ACC_2", PatientName="DOE^JANE", StudyDate="20240210", StudyTime="143000",
                 ReferringPhysicianName="Jones^Bob", Modality="CR", PatientAge="067Y")
    node.receive(STUDY_C, "P3", "ACC3", PatientName="Roe^Richard", StudyDate="20231231", StudyTime="080000")
    yield node
    node.catalog.close()


def studies(node: Node, **keys: str) -> list[str]:
    return [values["StudyInstanceUID"] for values in node.catalog.matches(keys, "STUDY")]


def test_universal_single_value_and_uid_list(node: Node) -> None:
    assert studies(node) == [STUDY_A, STUDY_B, STUDY_C]  # in the order received
    assert studies(node, PatientID="*") == [STUDY_A, STUDY_B, STUDY_C]
    assert studies(node, PatientID="P2") == [STUDY_B]
    assert studies(node, StudyInstanceUID=f"{STUDY_C}\\{STUDY_A}") == [STUDY_A, STUDY_C]
    assert studies(node, PatientID="P2", AccessionNumber="ACC1") == []  # every key must match


def test_a_uid_list_of_separators_only_matches_as_a_universal_key(node: Node) -> None:
    """Found by the C-FIND fuzz test: StudyInstanceUID '\\' named no UID and failed with 0xC311."""
    for value in ("\\", "\\ \\"):
        assert sorted(studies(node, StudyInstanceUID=value)) == sorted([STUDY_A, STUDY_B, STUDY_C])


def test_wildcards_and_case(node: Node) -> None:
    """A single value matches exactly, case included. A wildcard matches case included (PS3.4 C.2.2.2.4), except
    in a person's name (PN), where it ignores case."""
    assert studies(node, PatientName="Doe^John") == [STUDY_A]
    assert studies(node, PatientName="doe^john") == []
    assert studies(node, PatientName="doe*") == [STUDY_A, STUDY_B]
    assert studies(node, PatientName="?oe^*") == [STUDY_A, STUDY_B, STUDY_C]
    assert studies(node, ReferringPhysicianName="*^ANNA") == [STUDY_A]
    assert studies(node, AccessionNumber="ACC_*") == [STUDY_B]  # _ and % are literal, not SQL wildcards
    assert studies(node, AccessionNumber="ACC%") == []
    assert studies(node, AccessionNumber="ACC?") == [STUDY_A, STUDY_C]
    assert studies(node, AccessionNumber="acc*") == []  # not a name: case included
    assert studies(node, PatientID="p*") == []
    assert studies(node, PatientID="P*") == [STUDY_A, STUDY_B, STUDY_C]


def test_wildcards_match_glob_and_like_characters_as_themselves(tmp_path: Path) -> None:
    """[, ], % and _ are characters of the value, whatever the database's own pattern syntax."""
    node = Node(tmp_path)
    node.receive(STUDY_A, "P[1]", "A%_1")
    node.receive(STUDY_B, "P1", "A1")
    assert studies(node, PatientID="P[1]*") == [STUDY_A] and studies(node, PatientID="P[1*") == [STUDY_A]
    assert studies(node, PatientID="P[?]") == [STUDY_A] and studies(node, PatientID="P?") == [STUDY_B]
    assert studies(node, AccessionNumber="A%_*") == [STUDY_A] and studies(node, AccessionNumber="A_*") == []
    node.catalog.close()


def test_wildcards_in_postgresql() -> None:
    """LIKE there is case-sensitive: a wildcard goes through it, escaped; a name's through ILIKE."""
    sql = str(build_query({"PatientID": "P_[1]*", "PatientName": "doe*"}, "STUDY").compile(
        dialect=postgresql.psycopg.dialect(), compile_kwargs={"literal_binds": True}))
    assert "studies.patient_id LIKE 'P\\_[1]%%' ESCAPE '\\'" in sql, sql
    assert "studies.patient_name ILIKE 'doe%%' ESCAPE '\\'" in sql, sql


def test_a_wildcard_with_a_literal_start_is_answered_from_the_index(node: Node) -> None:
    """SQLite reads the patient ID index for P*, its pattern a bound parameter as the catalog sends it, not the whole
    table (as it did with a LIKE, which ignores case where the index does not)."""
    statement = build_query({"PatientID": "P*"}, "STUDY").compile(dialect=node.catalog.engine.dialect)
    parameters = [statement.params[name] for name in statement.positiontup or ()]
    assert parameters == ["P*"]
    with sqlite3.connect(node.url.removeprefix("sqlite:///")) as database:
        plan = " ".join(str(row[-1]) for row in database.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
    assert "USING INDEX ix_studies_patient_id (patient_id>? AND patient_id<?)" in plan, plan


def test_date_and_time_ranges(node: Node) -> None:
    assert studies(node, StudyDate="20240101-20241231") == [STUDY_A, STUDY_B]
    assert studies(node, StudyDate="-20231231") == [STUDY_C]
    assert studies(node, StudyDate="20240210-") == [STUDY_B]
    assert studies(node, StudyDate="20240105") == [STUDY_A]
    assert studies(node, StudyTime="1000-1015") == [STUDY_A]  # 1015 reaches up to 101599
    assert studies(node, StudyTime="14:00-") == [STUDY_B]


def test_modalities_levels_and_values(node: Node) -> None:
    assert studies(node, ModalitiesInStudy="CR") == [STUDY_A, STUDY_B]
    assert studies(node, ModalitiesInStudy="MR\\DX") == [STUDY_A, STUDY_C]
    assert studies(node, Modality="CR") == [STUDY_A, STUDY_B, STUDY_C]  # a SERIES key, ignored at STUDY level
    first = next(node.catalog.matches({"StudyInstanceUID": STUDY_A}, "STUDY"))
    assert first["ModalitiesInStudy"] == ["CR", "DX"]
    assert (first["NumberOfStudyRelatedSeries"], first["NumberOfStudyRelatedInstances"]) == (2, 2)
    series = list(node.catalog.matches({"StudyInstanceUID": STUDY_A, "Modality": "CR"}, "SERIES"))
    assert [(s["Modality"], s["PatientName"]) for s in series] == [("CR", "Doe^John")]  # with the study's keys
    assert "NumberOfStudyRelatedSeries" not in series[0]
    images = list(node.catalog.matches({"PatientID": "P1"}, "IMAGE"))
    assert len(images) == 2 and set(images[0]) == set(QUERY_KEYS)
    paged = list(node.catalog.matches({}, "STUDY", limit=1, offset=1, batch=1))
    assert [values["StudyInstanceUID"] for values in paged] == [STUDY_B]
    assert node.catalog.study_values([3, 1]).keys() == {1, 3}
    assert node.catalog.study_values([1])[1] == first


def test_matching_instances_at_each_level(node: Node) -> None:
    by_study = node.catalog.matching_instances({"StudyInstanceUID": STUDY_A}, "STUDY")
    assert len(by_study) == 2
    series_uid = next(node.catalog.matches({"StudyInstanceUID": STUDY_B}, "SERIES"))["SeriesInstanceUID"]
    (sop_uid, path, sop_class, syntax), = node.catalog.matching_instances({"SeriesInstanceUID": series_uid}, "SERIES")
    assert node.store.absolute(path).is_file() and path.startswith(f"{STUDY_B}/{series_uid}/")
    assert node.catalog.matching_instances({"SOPInstanceUID": sop_uid}, "IMAGE") == [(sop_uid, path, sop_class, syntax)]


def test_referring_physician_is_received_matched_and_answered(node: Node) -> None:
    """The key that needs only its line in QUERY_KEYS: stored by the Ingestor, matched as PN text, answered in
    C-FIND and QIDO identifiers."""
    assert studies(node, ReferringPhysicianName="Smith^Anna") == [STUDY_A]
    assert studies(node, ReferringPhysicianName="jones*") == [STUDY_B]
    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    request.ReferringPhysicianName = "*^Anna"
    request.PatientID = ""
    (values,) = node.catalog.matches(matching_keys(request), "STUDY")
    answer = response(request, "STUDY", values, "NODE")
    assert (answer.ReferringPhysicianName, answer.PatientID) == ("Smith^Anna", "P1")
    query = parse_query(QueryParams("ReferringPhysicianName=Jones*"), "STUDY", {})
    (values,) = node.catalog.matches(matching_keys(query.identifier), "STUDY")
    json = response(query.identifier, "STUDY", values, "NODE").to_json_dict()
    assert json["00080090"]["Value"] == [{"Alphabetic": "Jones^Bob"}]  # a QIDO default key


def test_patient_age_a_key_added_by_one_line_of_the_table(node: Node, tmp_path: Path) -> None:
    """PatientAge (Patient Study module, STUDY level) was added to the node by its line in QUERY_KEYS alone:
    received, matched, answered in C-FIND and QIDO identifiers, and added to a catalog made without it."""
    assert studies(node, PatientAge="067Y") == [STUDY_B]
    assert studies(node, PatientAge="06*") == [STUDY_B]
    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    request.StudyInstanceUID = STUDY_B
    request.PatientAge = ""
    (values,) = node.catalog.matches(matching_keys(request), "STUDY")
    assert response(request, "STUDY", values, "NODE").PatientAge == "067Y"
    query = parse_query(QueryParams("PatientAge=067Y&includefield=PatientAge"), "STUDY", {})
    (values,) = node.catalog.matches(matching_keys(query.identifier), "STUDY")
    assert response(query.identifier, "STUDY", values, "NODE").to_json_dict()["00101010"]["Value"] == ["067Y"]


def test_received_values_are_cut_to_their_column() -> None:
    ds = Dataset()
    ds.add(DataElement(0x00080090, "PN", "X" * 400, validation_mode=pydicom_config.IGNORE))
    ds.PatientName = " Doe^John "
    values = key_values(ds, "STUDY")
    assert len(values["referring_physician"]) == QUERY_KEYS["ReferringPhysicianName"].max_length == 324
    assert values["patient_name"] == "Doe^John" and values["accession_number"] == ""


def test_an_older_catalog_gains_the_columns_of_new_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A catalog made before ReferringPhysicianName and AccessionNumber were keys: opening it adds both columns
    (and the index of the indexed one), empty for the studies already held, with one warning."""
    node = Node(tmp_path)
    node.receive(STUDY_A, "P1", "ACC1", ReferringPhysicianName="Smith^Anna")
    node.catalog.close()
    with sqlite3.connect(tmp_path / "catalog.sqlite3") as db:
        db.executescript("DROP INDEX ix_studies_accession_number;"
                         "ALTER TABLE studies DROP COLUMN accession_number;"
                         "ALTER TABLE studies DROP COLUMN referring_physician;")
    with caplog.at_level(logging.WARNING, logger="indexer.catalog"):
        node = Node(tmp_path)
    assert [r.getMessage() for r in caplog.records if "columns added" in r.getMessage()] == [
        "catalog columns added, empty for the rows already held: studies.accession_number, "
        "studies.referring_physician"]
    with sqlite3.connect(tmp_path / "catalog.sqlite3") as db:
        assert ("ix_studies_accession_number",) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
    node.receive(STUDY_B, "P2", "ACC2", ReferringPhysicianName="Jones^Bob")
    assert [(v["AccessionNumber"], v["ReferringPhysicianName"]) for v in node.catalog.matches({}, "STUDY")] == [
        ("", ""), ("ACC2", "Jones^Bob")]
    assert studies(node, ReferringPhysicianName="Jones*") == [STUDY_B]
    node.catalog.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="indexer.catalog"):
        Node(tmp_path).catalog.close()
    assert not [r for r in caplog.records if "columns added" in r.getMessage()]
