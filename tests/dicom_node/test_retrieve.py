"""C-MOVE and C-GET over real associations: what a request must name, and how compressed studies travel.

Peers: dcmtk's movescu/getscu/storescp and pynetdicom; the study: RG1 in four encodings (studies.py).
"""
from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from itertools import islice
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_node.server import Node
from dicom_node.status import Status
from indexer.schema import Instance
from tests.dicom_node.builders import ROOT
from tests.dicom_node.studies import Study, assert_as_stored, assert_decoded_whole, by_sop, sample_study, upload
from tests.helpers import dcmtk, dcmtk_env, free_port, wait_for_port, wait_until

GET = StudyRootQueryRetrieveInformationModelGet
MOVE = StudyRootQueryRetrieveInformationModelMove
CR = ComputedRadiographyImageStorage


@pytest.fixture(scope="module")
def make_study(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Study]:
    """A study of the given kinds of image and a Basic Text SR report (sample_study)."""
    folder = tmp_path_factory.mktemp("rg1")
    return lambda *kinds: sample_study(shared_data, folder, *kinds)


@pytest.fixture()
def serve(start_node: Callable[..., Node]) -> Callable[..., Node]:
    """A node whose embedding job does not run: these tests are about transfer, not about the index."""
    return lambda **sections: start_node(scheduler={"interval_s": 3600}, **sections)


@pytest.fixture()
def storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    """Start dcmtk storescp (AE WORKSTATION) with the given options; (port, output folder)."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[int, Path]:
        port, out = free_port(), tmp_path / f"received{len(processes)}"
        out.mkdir()
        processes.append(subprocess.Popen(["storescp", "-aet", "WORKSTATION", "-od", str(out), *options, str(port)],
                                          env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(port)
        return port, out

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def workstation(port: int) -> list[dict[str, object]]:
    return [{"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": port}]


def movescu(node: Node, *keys: str) -> subprocess.CompletedProcess[str]:
    args = [arg for key in keys for arg in ("-k", key)]
    return dcmtk("movescu", "-v", "-S", "-aet", "VIEWER", "-aem", "WORKSTATION", "-aec", "MMDL_NODE", *args,
                 "127.0.0.1", node.port, timeout=120)


def getscu(node: Node, out: Path, *keys: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    args = [arg for key in keys for arg in ("-k", key)]
    return dcmtk("getscu", "-v", "-S", *options, "-aet", "VIEWER", "-aec", "MMDL_NODE", "-od", out, *args,
                 "127.0.0.1", node.port, timeout=120)


def logged_about(caplog: pytest.LogCaptureFixture, uid: str) -> list[logging.LogRecord]:
    """The node's log records that name ``uid``, and any warning from pynetdicom that does (the node's
    configuration shows pynetdicom's warnings only)."""
    return [r for r in caplog.records if uid in r.getMessage()
            and (r.name.startswith("dicom_node") or r.levelno >= logging.WARNING)]


# -- what a retrieve must name ------------------------------------------------------------------------

BAD_IDENTIFIERS = [
    pytest.param({"QueryRetrieveLevel": "STUDY"}, id="study-no-key"),
    pytest.param({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, id="study-empty"),
    pytest.param({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "*"}, id="study-star"),
    pytest.param({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, id="study-wildcard"),
    pytest.param({"QueryRetrieveLevel": "STUDY", "PatientID": "9RG1"}, id="study-by-patient"),
    pytest.param({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "{study}"}, id="series-no-series-uid"),
    pytest.param({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "{study}", "SeriesInstanceUID": "*"},
                 id="image-wildcards"),
    pytest.param({"QueryRetrieveLevel": "PATIENT", "PatientID": "9RG1"}, id="patient-level"),
    pytest.param({"StudyInstanceUID": "{study}"}, id="no-level"),
]


def identifier(keys: dict[str, str], study: Study) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value.format(study=study.uid))
    return ds


@pytest.mark.parametrize("keys", BAD_IDENTIFIERS)
def test_pynetdicom_get_and_move_must_name_what_they_take(serve: Callable[..., Node],
                                                          make_study: Callable[..., Study], storescp: Callable[...,
                                                          tuple[int, Path]], keys: dict[str, str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    port, out = storescp()
    node = serve(peers=workstation(port))
    study = make_study("explicit")
    upload(node, study)
    ae = AE("VIEWER")
    ae.add_requested_context(GET)
    ae.add_requested_context(MOVE)
    ae.add_requested_context(CR)
    ae.add_requested_context(BasicTextSRStorage)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0

    for operation in ("get", "move"):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE", evt_handlers=[(evt.EVT_C_STORE, on_store)],
                             ext_neg=[build_role(CR, scp_role=True), build_role(BasicTextSRStorage, scp_role=True)])
        query = identifier(keys, study)
        responses = assoc.send_c_get(query, GET) if operation == "get" else \
            assoc.send_c_move(query, "WORKSTATION", MOVE)
        (final, _), = list(responses)
        assoc.release()
        assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, operation
        assert "QueryRetrieveLevel" in final.ErrorComment or "UID" in final.ErrorComment
    assert received == [] and list(out.iterdir()) == []
    assert "9RG1" not in caplog.text and "CompressedSamples" not in caplog.text


def test_dcmtk_get_and_move_must_name_what_they_take(serve: Callable[..., Node], make_study: Callable[..., Study],
                                                     storescp: Callable[..., tuple[int, Path]], tmp_path: Path) -> None:
    """getscu and movescu without the unique key get 0xA900 and nothing; findscu then getscu by the UID found
    retrieves the study."""
    port, out = storescp("+xa")
    node = serve(peers=workstation(port))
    study = make_study("explicit")
    upload(node, study)
    for keys in (["QueryRetrieveLevel=STUDY"], ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=*"],
                 ["QueryRetrieveLevel=STUDY", "StudyInstanceUID="], ["QueryRetrieveLevel=STUDY", "PatientID=9RG1"],
                 ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study.uid}"]):
        got = getscu(node, tmp_path / "got", *keys)
        assert "DataSetDoesNotMatchSOPClass" in got.stderr or "Failed Suboperations    : 1" in got.stderr, got.stderr
        moved = movescu(node, *keys)
        assert "DataSetDoesNotMatchSOPClass" in moved.stderr, moved.stderr
    assert list((tmp_path / "got").iterdir()) == [] and list(out.iterdir()) == []
    # A viewer's way: findscu finds the study by patient, getscu retrieves it by the UID found.
    answers = tmp_path / "answers"
    answers.mkdir()
    found = dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_NODE", "-X", "-od", answers, "-k",
                  "QueryRetrieveLevel=STUDY", "-k", "PatientID=9RG1", "-k", "StudyInstanceUID", "127.0.0.1", node.port)
    assert found.returncode == 0, found.stderr
    (answer,) = [dcmread(p) for p in answers.iterdir()]
    got = getscu(node, tmp_path / "got", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={answer.StudyInstanceUID}")
    assert got.returncode == 0, got.stderr
    assert set(by_sop(tmp_path / "got")) == {study.sop("explicit"), study.sop("sr")}


def test_series_and_image_level_and_uid_lists(serve: Callable[..., Node], make_study: Callable[..., Study],
                                              storescp: Callable[..., tuple[int, Path]]) -> None:
    port, out = storescp("+xa")
    node = serve(peers=workstation(port))
    first, second, third = make_study("explicit"), make_study("j2k"), make_study("rle")
    for study in (first, second, third):
        upload(node, study)
    series = str(dcmread(first.files["explicit"], stop_before_pixels=True).SeriesInstanceUID)
    assert movescu(node, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={first.uid}",
                   f"SeriesInstanceUID={series}", f"SOPInstanceUID={first.sop('explicit')}").returncode == 0
    assert set(by_sop(out)) == {first.sop("explicit")}
    for path in out.iterdir():
        path.unlink()
    report_series = str(dcmread(first.files["sr"]).SeriesInstanceUID)
    assert movescu(node, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={first.uid}",
                   f"SeriesInstanceUID={report_series}").returncode == 0
    assert set(by_sop(out)) == {first.sop("sr")}
    for path in out.iterdir():
        path.unlink()
    assert movescu(node, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={second.uid}\\{third.uid}").returncode == 0
    assert set(by_sop(out)) == {second.sop("j2k"), second.sop("sr"), third.sop("rle"), third.sop("sr")}


# -- transfer syntaxes on retrieve -------------------------------------------------------------------

MIXED = ("explicit", "j2k", "j2k_lossy", "rle", "jpeg")


def test_movescu_to_an_uncompressed_only_storescp_gets_a_mixed_study_whole(
        serve: Callable[..., Node], make_study: Callable[..., Study],
        storescp: Callable[..., tuple[int, Path]]) -> None:
    port, out = storescp()  # dcmtk's default: uncompressed transfer syntaxes only
    node = serve(peers=workstation(port))
    study = make_study(*MIXED)
    upload(node, study)
    with node.catalog.session() as session:
        stored = [node.store.absolute(row.path) for row in session.query(Instance)]
    before = [path.read_bytes() for path in stored]
    moved = movescu(node, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.uid}")
    assert moved.returncode == 0 and "Final Move Response (Success)" in moved.stderr, moved.stderr
    assert_decoded_whole(study, by_sop(out))
    assert [path.read_bytes() for path in stored] == before  # decoding happened in memory only


def test_getscu_with_defaults_gets_a_mixed_study_whole(serve: Callable[..., Node],
                                                       make_study: Callable[..., Study], tmp_path: Path) -> None:
    node = serve()
    study = make_study(*MIXED)
    upload(node, study)
    got = getscu(node, tmp_path / "got", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.uid}")
    assert got.returncode == 0 and "Completed Suboperations : 6" in got.stderr, got.stderr
    assert_decoded_whole(study, by_sop(tmp_path / "got"))


def test_movescu_accepting_all_gets_the_stored_bytes(serve: Callable[..., Node],
                                                     make_study: Callable[..., Study],
                                                     storescp: Callable[..., tuple[int, Path]]) -> None:
    port, out = storescp("+xa")
    node = serve(peers=workstation(port))
    study = make_study(*MIXED)
    upload(node, study)
    assert movescu(node, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.uid}").returncode == 0
    assert_as_stored(study, by_sop(out))


@pytest.mark.parametrize(("kind", "prefer"), [("rle", "+xr"), ("j2k", "+xv")])
def test_getscu_preferring_the_stored_syntax_gets_the_stored_bytes(serve: Callable[..., Node],
                                                                   make_study: Callable[..., Study], tmp_path: Path,
                                                                   kind: str, prefer: str) -> None:
    """getscu offers one context per SOP class listing its preferred syntax first, then the uncompressed
    ones; the node accepts the syntax the class is stored in (getscu 3.6.7 has no accept-all option)."""
    node = serve()
    study = make_study(kind)
    upload(node, study)
    server_contexts = [(c.abstract_syntax, list(c.transfer_syntax)) for c in node.ae.supported_contexts]
    got = getscu(node, tmp_path / "got", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.uid}",
                 options=(prefer,))
    assert got.returncode == 0 and "Completed Suboperations : 2" in got.stderr, got.stderr
    assert_as_stored(study, by_sop(tmp_path / "got"))
    # The preference was that association's: the contexts every association shares are as they were.
    assert [(c.abstract_syntax, list(c.transfer_syntax)) for c in node.ae.supported_contexts] == server_contexts


class GetRequestor:
    """A pynetdicom C-GET requestor that keeps what it receives."""

    def __init__(self, contexts: list[tuple[str, list[str]]]) -> None:
        self.ae = AE("VIEWER")
        self.ae.add_requested_context(GET)
        for sop_class, syntaxes in contexts:
            self.ae.add_requested_context(sop_class, syntaxes)
        self.roles = [build_role(sop_class, scp_role=True) for sop_class in {c for c, _ in contexts}]
        self.received: dict[str, Dataset] = {}

    def on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received[str(ds.SOPInstanceUID)] = ds
        return 0

    def get(self, node: Node, study_uid: str) -> list[Dataset]:
        assoc = self.ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE", ext_neg=self.roles,
                                  evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        responses = [status for status, _ in assoc.send_c_get(query, GET)]
        assoc.release()
        return responses


def test_pynetdicom_get_with_several_syntaxes_in_one_context(serve: Callable[..., Node],
                                                            make_study: Callable[..., Study]) -> None:
    """One context per class listing Explicit VR LE first and RLE last: the node accepts RLE, the syntax its
    CR images are stored in, and sends them unchanged (before: Explicit VR LE accepted, then 0xB000)."""
    node = serve()
    study = make_study("rle")
    upload(node, study)
    requestor = GetRequestor([(CR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless]),
                              (BasicTextSRStorage, [ExplicitVRLittleEndian, RLELossless])])
    assert requestor.get(node, study.uid)[-1].Status == Status.SUCCESS
    assert_as_stored(study, requestor.received)


def test_a_class_held_in_several_syntaxes_is_sent_whole(serve: Callable[..., Node],
                                                        make_study: Callable[..., Study]) -> None:
    """CR held uncompressed and JPEG 2000, one context offering both: uncompressed is accepted, so that
    every image can go (the JPEG 2000 one decoded)."""
    node = serve()
    study = make_study("explicit", "j2k")
    upload(node, study)
    requestor = GetRequestor([(CR, [JPEG2000Lossless, ExplicitVRLittleEndian]),
                              (BasicTextSRStorage, [ExplicitVRLittleEndian])])
    assert requestor.get(node, study.uid)[-1].Status == Status.SUCCESS
    assert_decoded_whole(study, requestor.received)


# -- failures, logged once, and data on a rejected context ------------------------------------------

def test_unsendable_instance_fails_alone_and_is_logged_once(serve: Callable[..., Node],
                                                            make_study: Callable[..., Study],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The requestor offers CR in JPEG 2000 lossy only: the RLE image cannot go, the SR can."""
    node = serve()
    study = make_study("rle")
    upload(node, study)
    requestor = GetRequestor([(CR, [JPEG2000]), (BasicTextSRStorage, [ExplicitVRLittleEndian])])
    caplog.set_level(logging.INFO)
    final = requestor.get(node, study.uid)[-1]
    assert final.Status == Status.SUB_OPERATIONS_WITH_FAILURES
    assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 1
    assert set(requestor.received) == {study.sop("sr")}
    failures = logged_about(caplog, study.sop("rle"))
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert not any(r.exc_info for r in caplog.records)


def test_undecodable_instance_fails_alone_and_is_logged_once(serve: Callable[..., Node],
                                                             make_study: Callable[..., Study], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A stored JPEG 2000 instance whose codestream is not an image, asked for uncompressed: it fails
    alone (logged once by the node, no traceback from the node or pynetdicom), the rest of the study arrives."""
    node = serve()
    study = make_study("explicit")
    broken = dcmread(study.files["explicit"])
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid(prefix=ROOT)
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream" * 10])
    broken["PixelData"].VR = "OB"
    broken.file_meta.TransferSyntaxUID = JPEG2000Lossless
    study.files["broken"] = tmp_path / "broken.dcm"
    broken.save_as(study.files["broken"], enforce_file_format=True)
    upload(node, study)
    requestor = GetRequestor([(CR, [ExplicitVRLittleEndian]), (BasicTextSRStorage, [ExplicitVRLittleEndian])])
    caplog.set_level(logging.INFO)
    final = requestor.get(node, study.uid)[-1]
    assert final.Status == Status.SUB_OPERATIONS_WITH_FAILURES and final.NumberOfFailedSuboperations == 1
    assert set(requestor.received) == {study.sop("explicit"), study.sop("sr")}
    assert len(logged_about(caplog, study.sop("broken"))) == 1
    # (pydicom itself logs each decoding plugin's failure with its traceback; the node adds none)
    assert not any(r.exc_info for r in caplog.records if r.name.startswith(("dicom_node", "pynetdicom")))


def test_failure_answered_by_the_move_destination_is_logged_once(serve: Callable[..., Node],
                                                                make_study: Callable[..., Study],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A destination that refuses the SR with 0xA700: 0xB000 with the SR in the failed list, one log line."""
    study = make_study("explicit")
    refuse = study.sop("sr")
    destination = AE("WORKSTATION")
    destination.add_supported_context(CR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    destination.add_supported_context(BasicTextSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    kept: list[str] = []

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == refuse:
            return Status.OUT_OF_RESOURCES
        kept.append(uid)
        return Status.SUCCESS

    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        node = serve(peers=workstation(port))
        upload(node, study)
        ae = AE("VIEWER")
        ae.add_requested_context(MOVE)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
        caplog.set_level(logging.INFO)
        final = [status for status, _ in assoc.send_c_move(identifier({"QueryRetrieveLevel": "STUDY",
                                                                       "StudyInstanceUID": study.uid}, study),
                                                            "WORKSTATION", MOVE)][-1]
        assoc.release()
    finally:
        server.shutdown()
    assert final.Status == Status.SUB_OPERATIONS_WITH_FAILURES and final.NumberOfFailedSuboperations == 1
    assert kept == [study.sop("explicit")]
    assert len(logged_about(caplog, refuse)) == 1


def test_data_on_a_rejected_context_aborts_at_once_without_traceback(serve: Callable[..., Node],
                                                                    make_study: Callable[..., Study],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A client sends a CT image on the CT context the node rejected: the rejection and the abort are
    logged (AE titles, no patient data), the association is aborted at once, nothing is written."""
    node = serve(node={"message_timeout_s": 120.0})  # the watchdog would take minutes
    caplog.set_level(logging.INFO, logger="dicom_node.handlers")
    ct = dcmread(make_study("explicit").files["explicit"])
    ct.SOPClassUID = CTImageStorage
    crashes: list[threading.ExceptHookArgs] = []
    hook, threading.excepthook = threading.excepthook, crashes.append
    try:
        ae = AE("MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
        assert assoc.is_established and len(assoc.rejected_contexts) == 1
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, ct.SOPInstanceUID
        request.DataSet = BytesIO(encode(ct, False, True))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        for primitive in islice(message.encode_msg(assoc.rejected_contexts[0].context_id, 16384), 8):
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            try:
                assoc.dul.socket.socket.sendall(pdu.encode())
            except (AttributeError, OSError):  # the node's abort already arrived: the client dropped its socket
                break
        wait_until(lambda: not assoc.is_established, 5, "the association to be aborted")
    finally:
        threading.excepthook = hook
    assert assoc.is_aborted and crashes == []
    assert not any(r.exc_info for r in caplog.records) and "Traceback" not in caplog.text
    messages = [r.getMessage() for r in caplog.records if r.name == "dicom_node.handlers"]
    rejections = [r for r in caplog.records if "presentation contexts rejected" in r.getMessage()]
    assert [r.levelno for r in rejections] == [logging.INFO]  # routine: Verification was accepted
    assert any("MODALITY -> MMDL_NODE" in m and "CT Image Storage" in m and "not supported" in m for m in messages)
    assert len([m for m in messages if "aborted" in m]) == 1
    assert "9RG1" not in caplog.text and "CompressedSamples" not in caplog.text
    assert not list(node.store.incoming.glob("*.dcm"))
