"""The reference sheet over real parts: built from a loaded node, checked by dciodvfy, sent to storescp."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from config import settings_from_mapping
from config.loading import ConfigError
from dicom_node.reference_sheet import (
    LABEL,
    SERIES_DESCRIPTION,
    TILE,
    Layout,
    SheetsDisabledError,
    automatic_sheet_uid,
)
from dicom_node.server import Node
from dicom_node.sheet_marker import SHEET_CASES, SHEET_CREATOR, SHEET_GROUP, is_reference_sheet
from dicom_node.similar import PRIVATE_CREATOR, PRIVATE_GROUP, REFERENCE_SHEET, find_similar, query_study
from dicom_node.status import Status
from dicom_node.web.render import Renderer
from indexer.schema import Instance, Kind, Series, State, Study
from tests.dicom_node.peers import find, indexed, storescu, study_query
from tests.helpers import dcmtk, dcmtk_env, free_port, wait_for_port, wait_until


def _loaded(start_node: Callable[..., Node], studies: list[dict[str, object]], **sections: object) -> Node:
    node = start_node(**sections)
    result = storescu(node, *[s["image"] for s in studies], *[s["report"] for s in studies])
    assert result.returncode == 0, result.stderr
    wait_until(indexed(node, len(studies)), 120, "all studies to be indexed")
    return node


def _sheet_rows(node: Node) -> list[Instance]:
    with node.catalog.session() as session:
        return list(session.scalars(select(Instance).where(Instance.kind == Kind.SHEET)))


def _answers(node: Node, study_uid: str, sheet: str = "") -> list[tuple[str, str]]:
    query = study_query(StudyInstanceUID=study_uid)
    if sheet:
        query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(REFERENCE_SHEET, "CS", sheet)
    answers, final = find(node, query, called="MMDL_SIMILAR")
    assert final.Status == Status.SUCCESS
    return [(str(a.StudyInstanceUID), str(a.StudyDescription)) for a in answers]


def _strings(ds: Dataset) -> list[str]:
    """Every text value of the dataset, nested sequences included."""
    values: list[str] = []

    def visit(_: Dataset, element: object) -> None:
        value = getattr(element, "value", None)
        if getattr(element, "VR", "") in ("SQ", "OB", "OW", "UN"):
            return
        for item in value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]:
            if item is not None:
                values.append(str(item))

    ds.walk(visit)
    return values


def test_sheet_is_a_valid_sc_of_the_query_study_with_only_its_patient(start_node: Callable[..., Node],
                                                                      studies: list[dict[str, object]]) -> None:
    node = _loaded(start_node, studies, reference_sheet={"enabled": True})
    query = studies[1]
    result = node.sheets.create(str(query["uid"]), node.sheets.default_request(str(query["uid"]), top_k=3))
    assert result.cases == 3 and result.send_status is None  # no destination configured

    (row,) = _sheet_rows(node)
    path = node.store.absolute(row.path)
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not installed: apt-get install -y dicom3tools (.ci/run does)")
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in checked.stderr.splitlines() if line.startswith("Error")]
    assert not errors, checked.stderr
    assert "SCImage" in checked.stderr  # it recognised the IOD it checked

    sheet = dcmread(path)
    own = dcmread(query["image"], stop_before_pixels=True)
    assert sheet.SOPClassUID == SecondaryCaptureImageStorage and sheet.SOPInstanceUID == result.sop_uid
    assert sheet.StudyInstanceUID == query["uid"] and sheet.SeriesInstanceUID != own.SeriesInstanceUID
    assert sheet.SeriesDescription == SERIES_DESCRIPTION and list(sheet.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sheet.BurnedInAnnotation == "NO" and sheet.ImageComments == LABEL
    assert is_reference_sheet(sheet) and sheet.private_block(SHEET_GROUP, SHEET_CREATOR)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate",
                    "StudyTime", "StudyID"):
        assert sheet.get(keyword) == own.get(keyword), keyword

    # nothing of any other study: no patient ID, name, accession number, study/instance UID or study date
    text = "\n".join(_strings(sheet))
    for other in studies:
        other_ds = dcmread(other["image"], stop_before_pixels=True)
        if other_ds.PatientID == own.PatientID:
            continue
        for value in (other_ds.PatientID, str(other_ds.PatientName), other_ds.AccessionNumber, other_ds.StudyDate,
                      other_ds.StudyInstanceUID, other_ds.SeriesInstanceUID, other_ds.SOPInstanceUID):
            assert value not in text, value


def test_sheet_pixels_show_the_k_cases_pictures(start_node: Callable[..., Node],
                                               studies: list[dict[str, object]]) -> None:
    node = _loaded(start_node, studies, reference_sheet={"enabled": True})
    # studies 0 and 4 are one patient's: "not this patient" leaves study 4 out even when the query lets it in
    request = replace(node.sheets.default_request(str(studies[0]["uid"]), top_k=4), exclude_same_patient=False)
    query = query_study(node.catalog, request)
    answered = find_similar(node.catalog, node.index, query, request)
    assert str(studies[4]["uid"]) in {h.study.study_uid for h in answered}
    hits = find_similar(node.catalog, node.index, query, replace(request, exclude_same_patient=True))
    result = node.sheets.create(request.study_uid, request)
    pixels = dcmread(node.store.absolute(_sheet_rows(node)[0].path)).pixel_array
    layout = Layout(result.cases)
    assert result.cases == len(hits) == 3 and pixels.shape == (layout.size[1], layout.size[0])
    assert str(studies[4]["uid"]) not in {hit.study.study_uid for hit in hits}

    renderer = Renderer(node.store, node.settings.node.data_dir / "thumbnails")
    with node.catalog.session() as session:
        paths = {study_pk: path for study_pk, path in session.execute(
            select(Series.study_pk, Instance.path).join(Series, Instance.series_pk == Series.id)
            .where(Instance.kind == Kind.IMAGE))}
    for index, hit in enumerate(hits):  # each tile holds, exactly, the picture of the case at that rank
        picture = np.asarray(renderer.picture(paths[hit.study.id], TILE))
        left, top, _, _ = layout.tile_box(index)
        left += (TILE - picture.shape[1]) // 2
        top += (TILE - picture.shape[0]) // 2
        tile = pixels[top:top + picture.shape[0], left:left + picture.shape[1]]
        assert np.array_equal(tile, picture), f"tile {index + 1}"
    captions = pixels[layout.tile_box(0)[3]:layout.tile_box(0)[3] + 60, :]
    assert captions.max() == 255  # text under the tiles


def test_sheet_is_never_embedded_and_changes_no_answer(start_node: Callable[..., Node],
                                                       studies: list[dict[str, object]]) -> None:
    node = _loaded(start_node, studies, reference_sheet={"enabled": True})
    before = {s["uid"]: _answers(node, str(s["uid"])) for s in studies}
    vector_before = node.catalog.find_study(str(studies[2]["uid"])).vector
    node.sheets.create(str(studies[2]["uid"]))
    (row,) = _sheet_rows(node)
    assert row.state is State.SKIPPED and row.vector is None
    runs = node.scheduler.runs.get("embed", 0)
    wait_until(lambda: node.scheduler.runs.get("embed", 0) >= runs + 2, 30, "two more embedding rounds")
    assert not node.catalog.pending_images(1) and not node.catalog.dirty_studies(1)
    assert node.catalog.find_study(str(studies[2]["uid"])).vector == vector_before
    assert {s["uid"]: _answers(node, str(s["uid"])) for s in studies} == before


def test_cfind_option_builds_and_sends_the_sheet_answers_unchanged(start_node: Callable[..., Node],
                                                                   studies: list[dict[str, object]],
                                                                   storescp: tuple[int, Path],
                                                                   tmp_path: Path) -> None:
    port, out = storescp
    node = _loaded(start_node, studies, peers=[{"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": port}],
                   reference_sheet={"enabled": True, "destination": "WORKSTATION"})
    uid = str(studies[3]["uid"])
    plain = _answers(node, uid)
    assert _answers(node, uid, sheet="NO") == plain and not _sheet_rows(node)
    assert _answers(node, uid, sheet="YES") == plain
    wait_until(lambda: len(list(out.iterdir())) == len(_sheet_rows(node)) == 1, 60, "the sheet sent and kept")
    (received,) = [dcmread(p) for p in out.iterdir()]
    (row,) = _sheet_rows(node)
    assert received.SOPInstanceUID == row.sop_uid and received.StudyInstanceUID == uid
    assert received.SOPClassUID == SecondaryCaptureImageStorage and received.PatientID == studies[3]["patient"]
    assert received.private_block(SHEET_GROUP, SHEET_CREATOR)[SHEET_CASES].value == len(plain)  # the query's cases

    # the README's dcmtk commands ask for one too (findscu -k cannot set a private key: a query file can)
    (tmp_path / "query.txt").write_text(f"(0008,0052) CS [STUDY]\n(0020,000d) UI [{uid}]\n(0008,1030) LO []\n"
                                        "(0099,0010) LO [MMDL SIMILARITY 1.0]\n(0099,1005) CS [YES]\n")
    assert dcmtk("dump2dcm", tmp_path / "query.txt", tmp_path / "query.dcm").returncode == 0
    asked = dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_SIMILAR", "127.0.0.1", node.port,
                  tmp_path / "query.dcm")
    assert asked.returncode == 0, asked.stderr
    wait_until(lambda: len(list(out.iterdir())) == len(_sheet_rows(node)) == 2, 60, "a second sheet sent and kept")

    query = study_query(StudyInstanceUID=uid)
    query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(REFERENCE_SHEET, "CS", "MAYBE")
    answers, final = find(node, query, called="MMDL_SIMILAR")
    assert not answers and final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert "YES or NO" in final.ErrorComment


def test_every_new_study_gets_one_sheet_across_restarts(start_node: Callable[..., Node],
                                                        studies: list[dict[str, object]]) -> None:
    switch = {"reference_sheet": {"for_every_new_study": True, "top_k": 2}}
    node = _loaded(start_node, studies, **switch)
    wait_until(lambda: len(_sheet_rows(node)) == len(studies), 120, "one sheet per study")
    expected = {automatic_sheet_uid(str(s["uid"])) for s in studies}
    assert {row.sop_uid for row in _sheet_rows(node)} == expected
    node.stop()

    again = start_node(**switch)  # the same data directory
    assert again.sheets.create_for_new_studies() == 0
    assert {row.sop_uid for row in _sheet_rows(again)} == expected
    with again.catalog.session() as session:  # and none of them became a study or an embedding
        assert session.scalar(select(Study.id).where(Study.study_uid.not_in([s["uid"] for s in studies]))) is None


def test_sheet_destination_must_be_a_peer() -> None:
    with pytest.raises(ConfigError, match="reference_sheet.destination"):
        settings_from_mapping({"reference_sheet": {"destination": "PACS"}})


def test_sheets_on_request_only_when_enabled(start_node: Callable[..., Node],
                                            studies: list[dict[str, object]]) -> None:
    node = _loaded(start_node, studies)  # [reference_sheet] enabled = false, the default
    uid = str(studies[0]["uid"])
    with pytest.raises(SheetsDisabledError):
        node.sheets.create(uid)
    plain = _answers(node, uid)
    assert _answers(node, uid, sheet="YES") == plain  # answered as usual
    node.sheets.close()  # waits for the background request to end
    assert not _sheet_rows(node)


def test_every_new_study_sheet_waits_for_its_peer(start_node: Callable[..., Node], studies: list[dict[str, object]],
                                                  tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "received"
    node = _loaded(start_node, studies, peers=[{"ae_title": "PACS", "host": "127.0.0.1", "port": port}],
                   reference_sheet={"for_every_new_study": True, "destination": "PACS", "top_k": 2})
    runs = node.scheduler.runs.get("reference_sheets", 0)
    wait_until(lambda: node.scheduler.runs.get("reference_sheets", 0) >= runs + 2, 30, "two looks at new studies")
    assert not _sheet_rows(node)  # the peer is down: nothing sent, nothing kept

    out.mkdir()
    peer = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(out), "+xa", str(port)], env=dcmtk_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        wait_until(lambda: len(_sheet_rows(node)) == len(studies), 120, "every study's sheet once the peer is up")
        assert {dcmread(p).SOPInstanceUID for p in out.iterdir()} == {row.sop_uid for row in _sheet_rows(node)}
    finally:
        peer.terminate()
        peer.wait(timeout=10)
