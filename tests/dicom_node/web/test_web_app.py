"""The node's web app as a whole: the reference-sheet request, the headers of every answer, the findings filter
without a calibration, and who may serve it without authentication."""
from __future__ import annotations

import gc
import socket
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from config import settings_from_mapping
from config.loading import ConfigError
from dicom_node.server import Node
from dicom_node.web import instances
from tests.dicom_node.conftest import node_settings
from tests.dicom_node.web.conftest import WebNode, store_studies
from tests.helpers import free_port

JPEG = "dicom/torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def test_reference_sheet_request_builds_keeps_and_answers_the_sheet(tmp_path: Path, calibrated_model_dir: Path,
                                                                      shared_data: Path) -> None:
    settings = node_settings(tmp_path / "node", calibrated_model_dir, reference_sheet={"enabled": True},
                             web={"enabled": True, "host": "127.0.0.1", "port": free_port()})
    node = Node(settings)
    node.start()
    try:
        studies = store_studies(node, shared_data, tmp_path / "send", 3)
        assert node.web is not None
        url = f"{node.web.url}/api/studies/{studies[0].uid}/reference-sheet"
        form = httpx.post(url, data={"study": "x"})  # what a cross-site HTML form can send
        assert form.status_code == 415 and "application/json" in form.json()["detail"]
        answer = httpx.post(url, json={})
        assert answer.status_code == 201, answer.text
        sheet = answer.json()
        assert sheet["study_uid"] == studies[0].uid and sheet["cases"] == 1  # study 1 is the same patient's
        assert sheet["destination"] == "" and sheet["send_status"] is None
        assert node.catalog.find_instance_study(sheet["sop_uid"]) == studies[0].uid
        unknown = httpx.post(f"{node.web.url}/api/studies/1.2.3.4.5/reference-sheet", json={})
        assert unknown.status_code == 404
    finally:
        node.stop()


def test_reference_sheets_switched_off_are_403(web_node: WebNode) -> None:
    answer = httpx.post(f"{web_node.url}/api/studies/{web_node.studies[0].uid}/reference-sheet", json={})
    assert answer.status_code == 403 and answer.json()["error"] == "Reference sheets disabled"


def test_every_answer_is_nosniff_and_not_cached_unless_its_route_says(web_node: WebNode) -> None:
    study = web_node.studies[0]
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{study.uid}/metadata", "/dicomweb/studies/1.2.3.4/metadata",
                 f"/api/studies/{study.uid}/similar", "/no/such/route"):
        answer = httpx.get(web_node.url + path)
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["cache-control"] == "no-store", path
    thumbnail = httpx.get(f"{web_node.url}/thumbnails/{study.sop_uid}.jpg")
    assert thumbnail.headers["cache-control"].startswith("private")  # its own, kept
    assert thumbnail.headers["x-content-type-options"] == "nosniff"


def test_findings_filter_needs_a_calibrated_model(web_node: WebNode) -> None:
    """The test node's random model has no calibration: a filter would keep nothing after searching everything."""
    answer = httpx.get(f"{web_node.url}/api/studies/{web_node.studies[0].uid}/similar", params={"findings": "Edema"})
    assert answer.status_code == 400 and "calibrated model" in answer.json()["detail"]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_no_authentication_beyond_loopback_unless_the_admin_says_so(host: str) -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        settings_from_mapping({"web": {"enabled": True, "host": host}})
    trusted = {"enabled": True, "host": host, "allow_unauthenticated": True}
    assert settings_from_mapping({"web": trusted}).web.host == host
    token = {"enabled": True, "host": host, "auth": "token", "token": "t" * 16}
    assert settings_from_mapping({"web": token}).web.auth == "token"
    assert settings_from_mapping({"web": {"enabled": True, "host": "127.0.0.1"}}).web.auth == "none"


def test_wado_instance_decoded_from_jpeg_stays_marked_lossy(shared_data: Path, tmp_path: Path) -> None:
    """A JPEG baseline instance whose sender did not mark it lossy, asked for uncompressed: marked as on retrieve."""
    unmarked = pydicom.dcmread(shared_data / JPEG)
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio"):
        unmarked.pop(keyword, None)
    unmarked.save_as(tmp_path / "unmarked.dcm", enforce_file_format=True)
    decoded = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        instances.part10(tmp_path / "unmarked.dcm", JPEGBaseline8Bit, ExplicitVRLittleEndian)))
    assert decoded.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert decoded.LossyImageCompression == "01" and decoded.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(decoded.LossyImageCompressionRatio) > 1


def test_kept_alive_connections_have_nagle_off(web_node: WebNode) -> None:
    """Each answer is written as headers then body: with Nagle's algorithm on, the body of every answer after the
    first on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    assert web_node.node.web is not None
    port = web_node.node.web.port
    with httpx.Client() as client:
        for _ in range(2):
            assert client.get(f"{web_node.url}/thumbnails/1.2.3.jpg").status_code == 404
        accepted = [s for s in gc.get_objects() if type(s) is socket.socket and s.fileno() != -1
                    and s.family in (socket.AF_INET, socket.AF_INET6) and s.getsockname()[1] == port
                    and _connected(s)]
        assert accepted
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
