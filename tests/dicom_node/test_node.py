"""The node over real associations on loopback: dcmtk tools and pynetdicom as its peers."""
from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from dicom_node.server import Node
from dicom_node.similar import (
    EXCLUDE_SAME_PATIENT,
    FINDING_PROBABILITIES,
    FINDING_SCORES,
    FINDINGS_FILTER,
    MATCH_PROBABILITY,
    MIN_SCORE,
    MODEL_VERSION,
    ORIGINAL_DESCRIPTION,
    PREDICTED_FINDINGS,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    RANK,
    SCORE,
    TOP_K,
)
from dicom_node.status import Status
from indexer.catalog import to_blob
from indexer.schema import Instance, Study
from models.observations import OBSERVATIONS
from tests.conftest import REPO_ROOT
from tests.dicom_node.builders import undecodable
from tests.dicom_node.peers import FIND, find, indexed, storescu, study_query
from tests.helpers import dcmtk, dcmtk_env, wait_until


@pytest.fixture()
def loaded(start_node: Callable[..., Node], studies: list[dict[str, object]], calibrated_model_dir: Path) -> Node:
    """A node holding the five studies, with a model whose calibration shows each finding scored >= 0.5."""
    node = start_node(peers=[], model={"path": str(calibrated_model_dir)})
    files = [s["image"] for s in studies] + [s["report"] for s in studies]
    result = storescu(node, *files)
    assert result.returncode == 0, result.stderr
    wait_until(indexed(node, len(studies)), 120, "all studies to be indexed")
    return node


def test_echo_on_both_titles_and_unknown_called_title_rejected(start_node: Callable[..., Node]) -> None:
    node = start_node()
    for title in ("MMDL_NODE", "MMDL_SIMILAR"):
        assert dcmtk("echoscu", "-aec", title, "127.0.0.1", node.port).returncode == 0
    refused = dcmtk("echoscu", "-aec", "SOMEONE_ELSE", "127.0.0.1", node.port)
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stderr


def test_calling_title_not_in_allowlist_rejected(start_node: Callable[..., Node]) -> None:
    node = start_node(access={"allowed_calling_aets": ["PACS"]})
    assert dcmtk("echoscu", "-aet", "PACS", "-aec", "MMDL_NODE", "127.0.0.1", node.port).returncode == 0
    refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "MMDL_NODE", "127.0.0.1", node.port)
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr


def test_store_keeps_the_bytes_and_catalogs_once(loaded: Node, studies: list[dict[str, object]]) -> None:
    sent = studies[0]["image"]
    sop = studies[0]["sop"]
    with loaded.catalog.session() as session:
        row = session.query(Instance).filter_by(sop_uid=sop).one()
        stored = loaded.store.absolute(row.path)
    assert stored.is_file() and stored.is_relative_to(loaded.settings.node.data_dir)
    original, kept = dcmread(sent), dcmread(stored)
    assert kept.PixelData == original.PixelData and kept.SOPInstanceUID == sop
    # Sending the same instances again changes nothing.
    assert storescu(loaded, sent, studies[0]["report"]).returncode == 0
    with loaded.catalog.session() as session:
        assert session.query(Instance).count() == 2 * len(studies)
        assert session.query(Study).count() == len(studies)
    assert loaded.catalog.pending_images(10) == [] and len(loaded.index) == len(studies)


def test_conflicting_duplicate_refused_and_original_kept(loaded: Node, studies: list[dict[str, object]],
                                                         tmp_path: Path) -> None:
    forged = dcmread(studies[1]["image"])
    forged.StudyInstanceUID = generate_uid()
    forged.PixelData = bytes(len(forged.PixelData))
    path = tmp_path / "forged.dcm"
    forged.save_as(path)
    ae = AE("PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", loaded.port, ae_title="MMDL_NODE")
    assert assoc.send_c_store(path).Status == Status.DUPLICATE_CONFLICT
    assoc.release()
    with loaded.catalog.session() as session:
        row = session.query(Instance).filter_by(sop_uid=studies[1]["sop"]).one()
        assert dcmread(loaded.store.absolute(row.path)).PixelData == dcmread(studies[1]["image"]).PixelData
    assert not list((loaded.settings.node.data_dir / "storage").glob(f"{forged.StudyInstanceUID}*"))


@pytest.mark.parametrize(("attribute", "bad_uid"), [
    ("SOPInstanceUID", "../../../../tmp/evil"), ("SOPInstanceUID", "1.2.3/4"),
    ("StudyInstanceUID", "1" * 70), ("SeriesInstanceUID", "1.2.abc"), ("StudyInstanceUID", "../.."),
])
def test_bad_uids_refused_and_nothing_written_outside(start_node: Callable[..., Node], studies: list[dict[str, object]],
                                                      attribute: str, bad_uid: str) -> None:
    node = start_node()
    ds = dcmread(studies[0]["image"])
    setattr(ds, attribute, bad_uid)
    ae = AE("PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert attribute in status.ErrorComment
    data_dir = node.settings.node.data_dir
    assert not list((data_dir / "storage").rglob("*.dcm"))
    assert not Path("/tmp/evil").exists() and not (data_dir.parent / "evil").exists()


def test_find_matching_at_every_level(loaded: Node, studies: list[dict[str, object]]) -> None:
    answers, final = find(loaded, study_query(PatientID="PAT-A"))
    assert final.Status == 0 and sorted(a.StudyInstanceUID for a in answers) == sorted(
        s["uid"] for s in studies if s["patient"] == "PAT-A")
    assert all(list(a.ModalitiesInStudy) == ["DX", "SR"] and a.NumberOfStudyRelatedInstances == 2 for a in answers)
    assert len(find(loaded, study_query(PatientID="PAT-?"))[0]) == 5
    assert {a.StudyDate for a in find(loaded, study_query(StudyDate="20240102-20240103"))[0]} == {"20240102", "20240103"}
    assert len(find(loaded, study_query(StudyDate="-20240101"))[0]) == 1
    uid_list = "\\".join(str(s["uid"]) for s in studies[:3])
    assert len(find(loaded, study_query(StudyInstanceUID=uid_list))[0]) == 3
    assert find(loaded, study_query(AccessionNumber="NOPE"))[0] == []

    series = Dataset()
    series.QueryRetrieveLevel = "SERIES"
    series.StudyInstanceUID = studies[2]["uid"]
    series.SeriesInstanceUID = ""
    series.Modality = "DX"
    answers, _ = find(loaded, series)
    assert [a.Modality for a in answers] == ["DX"]

    image = Dataset()
    image.QueryRetrieveLevel = "IMAGE"
    image.StudyInstanceUID = studies[2]["uid"]
    image.SeriesInstanceUID = answers[0].SeriesInstanceUID
    image.SOPInstanceUID = ""
    assert [a.SOPInstanceUID for a in find(loaded, image)[0]] == [studies[2]["sop"]]

    bad = Dataset()
    bad.QueryRetrieveLevel = "PATIENT"
    assert find(loaded, bad)[1].Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


def test_findscu_on_the_similar_title(loaded: Node, studies: list[dict[str, object]], tmp_path: Path) -> None:
    out = tmp_path / "answers"
    out.mkdir()
    result = dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_SIMILAR", "-X", "-od", out,
                   "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies[0]['uid']}",
                   "-k", "StudyDescription", "-k", "PatientID", "-k", "ModalitiesInStudy",
                   "127.0.0.1", loaded.port)
    assert result.returncode == 0, result.stderr
    answers = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
    assert len(answers) == len(studies) - 1
    assert studies[0]["uid"] not in {a.StudyInstanceUID for a in answers}
    assert [a.StudyDescription.split()[0] for a in answers] == [f"#{i}" for i in range(1, len(answers) + 1)]
    matches = [int(a.StudyDescription.split()[1].rstrip("%:")) for a in answers]  # '#1 97%: ...'
    assert matches == sorted(matches, reverse=True)


def test_similar_by_accession_and_private_keys(loaded: Node, studies: list[dict[str, object]]) -> None:
    by_accession, final = find(loaded, study_query(AccessionNumber="ACC0"), "MMDL_SIMILAR")
    by_uid, _ = find(loaded, study_query(StudyInstanceUID=studies[0]["uid"]), "MMDL_SIMILAR")
    assert final.Status == 0 and [a.StudyInstanceUID for a in by_accession] == [a.StudyInstanceUID for a in by_uid]

    query = study_query(StudyInstanceUID=studies[0]["uid"])
    block = query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(TOP_K, "IS", "2")
    block.add_new(EXCLUDE_SAME_PATIENT, "CS", "YES")
    answers, final = find(loaded, query, "MMDL_SIMILAR")
    assert final.Status == 0 and len(answers) == 2
    assert all(a.PatientID != "PAT-A" for a in answers)
    ranks = [int(a.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[RANK].value) for a in answers]
    scores = [float(a.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[SCORE].value) for a in answers]
    assert ranks == [1, 2] and scores[0] >= scores[1]
    assert all(a.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[MODEL_VERSION].value for a in answers)


def private(answer: Dataset, offset: int) -> object:
    """A private answer element's value (answers read in Explicit VR, so values are typed)."""
    return answer.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[offset].value


def similar_query(study_uid: str, **keys: tuple[str, object]) -> Dataset:
    """A similar-case query naming ``study_uid``, with private keys given as offset name -> (VR, value)."""
    query = study_query(StudyInstanceUID=study_uid)
    block = query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    offsets = {"top_k": TOP_K, "min_score": MIN_SCORE, "exclude": EXCLUDE_SAME_PATIENT, "findings": FINDINGS_FILTER}
    for name, (vr, value) in keys.items():
        block.add_new(offsets[name], vr, value)
    return query


def set_findings(node: Node, study_uid: object, positive: dict[str, float]) -> list[float]:
    """Give a study these finding probabilities (all others 0.05), as the embedding job would have stored them."""
    scores = [positive.get(name, 0.05) for name in OBSERVATIONS]
    with node.catalog.session() as session:
        session.query(Study).filter_by(study_uid=study_uid).one().label_scores = to_blob(np.array(scores))
        session.commit()
    return scores


def test_similar_min_score(loaded: Node, studies: list[dict[str, object]]) -> None:
    everything, _ = find(loaded, similar_query(studies[0]["uid"]), "MMDL_SIMILAR", ExplicitVRLittleEndian)
    scores = [float(private(a, SCORE)) for a in everything]
    assert len(scores) == len(studies) - 1 and scores == sorted(scores, reverse=True)
    assert scores[1] > scores[2], "the test needs distinct scores"
    threshold = f"{(scores[1] + scores[2]) / 2:.6f}"
    answers, final = find(loaded, similar_query(studies[0]["uid"], min_score=("DS", threshold)), "MMDL_SIMILAR")
    assert final.Status == Status.SUCCESS
    assert [a.StudyInstanceUID for a in answers] == [a.StudyInstanceUID for a in everything[:2]]
    _, final = find(loaded, similar_query(studies[0]["uid"], min_score=("DS", "1.5")), "MMDL_SIMILAR")
    assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS and "minimum score" in final.ErrorComment
    _, final = find(loaded, similar_query(studies[0]["uid"], min_score=("DS", ["0.1", "0.2"])), "MMDL_SIMILAR")
    assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS and "takes one value" in final.ErrorComment


def test_similar_findings_filter_in_both_vrs_and_encodings(loaded: Node, studies: list[dict[str, object]],
                                                           tmp_path: Path) -> None:
    set_findings(loaded, studies[1]["uid"], {"Cardiomegaly": 0.95})
    set_findings(loaded, studies[3]["uid"], {"Edema": 0.9, "Enlarged Cardiomediastinum": 0.8})
    for other in (studies[0], studies[2], studies[4]):
        set_findings(loaded, other["uid"], {})
    for transfer_syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        for vr in ("CS", "LO"):
            where = f"{vr} in {transfer_syntax.name}"
            query = similar_query(studies[0]["uid"], findings=(vr, ["cardiomegaly", "EDEMA"]))
            answers, final = find(loaded, query, "MMDL_SIMILAR", transfer_syntax)
            assert final.Status == Status.SUCCESS, where
            assert {a.StudyInstanceUID for a in answers} == {studies[1]["uid"], studies[3]["uid"]}, where
            # A name longer than 16 characters (the CS limit), one value.
            query = similar_query(studies[0]["uid"], findings=(vr, "Enlarged Cardiomediastinum"))
            answers, _ = find(loaded, query, "MMDL_SIMILAR", transfer_syntax)
            assert [a.StudyInstanceUID for a in answers] == [studies[3]["uid"]], where
            _, final = find(loaded, similar_query(studies[0]["uid"], findings=(vr, ["Edema", "Dragons"])),
                            "MMDL_SIMILAR", transfer_syntax)
            assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, where
            assert "Dragons" in final.ErrorComment, where
    # dcmtk's findscu with the project's dictionary entries for the private block (docs/mmdl-similarity.dic).
    dictionaries = sorted(Path("/usr/share").glob("libdcmtk*/dicom.dic"))
    assert dictionaries, "dcmtk's data dictionary (Debian: /usr/share/libdcmtk*/dicom.dic) not found"
    out = tmp_path / "filtered"
    out.mkdir()
    result = subprocess.run(
        ["findscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_SIMILAR", "-X", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies[0]['uid']}",
         "-k", f"(0099,0010)={PRIVATE_CREATOR}", "-k", f"(0099,10{FINDINGS_FILTER:02X})=Edema\\cardiomegaly",
         "127.0.0.1", str(loaded.port)],
        capture_output=True, text=True, timeout=60,
        env={**dcmtk_env(), "DCMDICTPATH": f"{dictionaries[-1]}:{REPO_ROOT / 'docs' / 'mmdl-similarity.dic'}"})
    assert result.returncode == 0, result.stderr
    assert {dcmread(p).StudyInstanceUID for p in out.glob("rsp*.dcm")} == {studies[1]["uid"], studies[3]["uid"]}


def test_similar_answer_keys_and_description_within_64(loaded: Node, studies: list[dict[str, object]]) -> None:
    """The answer shows at most three calibrated findings, never No Finding beside a disease, the match
    probability in its description, and keeps that description within 64 characters."""
    crowded = set_findings(loaded, studies[2]["uid"], {"Enlarged Cardiomediastinum": 0.99, "Pleural Effusion": 0.98,
                                                       "Support Devices": 0.97, "Edema": 0.6})
    some = set_findings(loaded, studies[3]["uid"], {"Edema": 0.9, "Cardiomegaly": 0.7, "No Finding": 0.8})
    answers, final = find(loaded, similar_query(studies[0]["uid"]), "MMDL_SIMILAR", ExplicitVRLittleEndian)
    assert final.Status == Status.SUCCESS
    by_uid = {a.StudyInstanceUID: a for a in answers}
    expected = {studies[2]["uid"]: (crowded, ["Enlarged Cardiomediastinum", "Pleural Effusion", "Support Devices"]),
                studies[3]["uid"]: (some, ["Edema", "Cardiomegaly"])}
    for uid, (scores, shown) in expected.items():
        answer = by_uid[uid]
        assert [float(v) for v in private(answer, FINDING_SCORES)] == pytest.approx(scores, abs=1e-4)
        assert list(private(answer, PREDICTED_FINDINGS)) == shown
        probabilities = [scores[OBSERVATIONS.index(name)] for name in shown]  # the identity calibration
        assert [float(v) for v in private(answer, FINDING_PROBABILITIES)] == pytest.approx(probabilities, abs=1e-4)
        match = (1 + float(private(answer, SCORE))) / 2
        assert float(private(answer, MATCH_PROBABILITY)) == pytest.approx(match, abs=1e-4)
        assert answer.StudyDescription.startswith(f"#{int(private(answer, RANK))} {match:.0%}: ")
        assert private(answer, ORIGINAL_DESCRIPTION) == "CHEST PA"
        assert len(answer.StudyDescription) <= 64
    assert by_uid[studies[3]["uid"]].StudyDescription.endswith(": Edema, Cardiomegaly")
    assert by_uid[studies[2]["uid"]].StudyDescription.endswith(": Enlarged Cardiomediastinum, Pleural Effusion +1")


def test_similar_cancel_mid_answers(loaded: Node, studies: list[dict[str, object]]) -> None:
    """The client cancels after its first answer: the node stops sending and ends with Cancel.

    pynetdicom's EVT_DIMSE_SENT fires just before a message goes out: the node's side holds its second answer
    until the C-CANCEL has arrived, so the cancel always lands while answers remain (one or two are sent)."""
    pending_sent: list[int] = []

    def hold_second_answer(event: Event) -> None:
        message = event.message
        if type(message).__name__ == "C_FIND_RSP" and message.command_set.Status == Status.PENDING:
            pending_sent.append(1)
            if len(pending_sent) == 2:
                wait_until(lambda: bool(event.assoc.dimse.cancel_req), 30, "the C-CANCEL to arrive")

    ae = AE("VIEWER")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", loaded.port, ae_title="MMDL_SIMILAR")
    assert assoc.is_established
    (served,) = loaded.ae.active_associations
    served.bind(evt.EVT_DIMSE_SENT, hold_second_answer)
    statuses = []
    for status, _ in assoc.send_c_find(similar_query(studies[0]["uid"]), FIND, msg_id=7):
        statuses.append(status.Status)
        if statuses == [Status.PENDING]:
            assoc.send_c_cancel(7, query_model=FIND)
    assoc.release()
    assert statuses[-1] == Status.CANCEL and set(statuses[:-1]) == {Status.PENDING}
    assert 1 <= len(statuses) - 1 <= 2 < len(studies) - 1


def test_an_answer_that_cannot_be_encoded_ends_the_find(loaded: Node, studies: list[dict[str, object]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The answers before it are sent; the C-FIND ends with 0xC312, as pynetdicom's service ends it."""
    from dicom_node import handlers

    written = handlers.encode_identifier
    calls: list[int] = []

    def fail_second(identifier: Dataset, syntax: str) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("an answer identifier could not be encoded")
        return written(identifier, syntax)

    monkeypatch.setattr(handlers, "encode_identifier", fail_second)
    answers, final = find(loaded, similar_query(studies[0]["uid"]), "MMDL_SIMILAR")
    assert len(answers) == 1 and final.Status == Status.IDENTIFIER_NOT_ENCODED == 0xC312


def test_similar_failures_are_clear(loaded: Node, studies: list[dict[str, object]],
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "dicom_node.handlers")
    _, final = find(loaded, study_query(StudyInstanceUID="1.2.3.999"), "MMDL_SIMILAR")
    assert final.Status == Status.UNKNOWN_STUDY and "1.2.3.999" in final.ErrorComment
    _, final = find(loaded, study_query(AccessionNumber="ACC-NOT-HELD"), "MMDL_SIMILAR")
    assert final.Status == Status.UNKNOWN_STUDY
    _, final = find(loaded, study_query(), "MMDL_SIMILAR")
    assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    # One study per query: a UID list is refused, in both VR encodings.
    uid_list = [str(studies[0]["uid"]), str(studies[1]["uid"])]
    for transfer_syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        _, final = find(loaded, study_query(StudyInstanceUID="\\".join(uid_list)), "MMDL_SIMILAR", transfer_syntax)
        assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS and "exactly one study" in final.ErrorComment
    refusals = [r.getMessage() for r in caplog.records if "similar-case query" in r.getMessage()]
    assert len(refusals) == 5
    assert all("from VIEWER to MMDL_SIMILAR refused with 0x" in line for line in refusals)
    assert "0xC101: unknown study: 1.2.3.999" in refusals[0]
    assert "ACC-NOT-HELD" not in caplog.text and "PAT-" not in caplog.text and "TEST^" not in caplog.text


def test_move_to_a_configured_peer_and_refuse_unknown(start_node: Callable[..., Node], studies: list[dict[str, object]],
                                                      storescp: tuple[int, Path]) -> None:
    port, out = storescp
    node = start_node(peers=[{"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": port}])
    assert storescu(node, studies[3]["image"], studies[3]["report"]).returncode == 0
    moved = dcmtk("movescu", "-S", "-aet", "VIEWER", "-aem", "WORKSTATION", "-aec", "MMDL_SIMILAR",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies[3]['uid']}",
                  "127.0.0.1", node.port)
    assert moved.returncode == 0, moved.stderr
    received = {dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert received == {studies[3]["sop"], dcmread(studies[3]["report"]).SOPInstanceUID}
    unknown = dcmtk("movescu", "-v", "-S", "-aet", "VIEWER", "-aem", "NOBODY", "-aec", "MMDL_NODE",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies[3]['uid']}",
                    "127.0.0.1", node.port)
    assert "Refused: MoveDestinationUnknown" in unknown.stderr


def test_get_returns_the_stored_study(start_node: Callable[..., Node], studies: list[dict[str, object]],
                                      tmp_path: Path) -> None:
    node = start_node()
    assert storescu(node, studies[2]["image"], studies[2]["report"]).returncode == 0
    out = tmp_path / "got"
    out.mkdir()
    got = dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_NODE", "-od", out,
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies[2]['uid']}",
                "127.0.0.1", node.port)
    assert got.returncode == 0, got.stderr
    files = list(out.iterdir())
    assert {dcmread(p).SOPInstanceUID for p in files} == {studies[2]["sop"], dcmread(studies[2]["report"]).SOPInstanceUID}
    assert dcmread(next(p for p in files if dcmread(p).Modality == "DX")).PixelData == dcmread(studies[2]["image"]).PixelData


def test_undecodable_image_fails_alone(start_node: Callable[..., Node], studies: list[dict[str, object]],
                                       tmp_path: Path) -> None:
    node = start_node()
    broken = dcmread(studies[1]["image"])
    broken.SOPInstanceUID = generate_uid()
    broken.StudyInstanceUID = generate_uid()
    undecodable(broken)
    ae = AE("PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, [JPEG2000Lossless])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert assoc.send_c_store(broken).Status == Status.SUCCESS
    assoc.release()
    assert storescu(node, studies[4]["image"]).returncode == 0
    wait_until(lambda: not node.catalog.pending_images(1) and len(node.index) == 1, 120, "the good image indexed")
    with node.catalog.session() as session:
        failed = session.query(Instance).filter_by(sop_uid=str(broken.SOPInstanceUID)).one()
    assert failed.state.value == "failed" and failed.reason
