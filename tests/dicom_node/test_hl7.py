"""HL7 v2 ORU^R01 over MLLP, sent with the `hl7` package's real `mllp_send` tool and its MLLPClient."""
from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import hl7
import pytest
from hl7.client import MLLPClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from sqlalchemy import select

from config.settings import Hl7Settings
from dicom_node.hl7 import Hl7Listener
from dicom_node.server import Node
from indexer.catalog import Catalog
from indexer.schema import Report, State, Study
from tests.dicom_node.builders import dx_synthetic, save
from tests.helpers import dcmtk, free_port, wait_until

MLLP_SEND = Path(sys.executable).parent / "mllp_send"
SB, EB = b"\x0b", b"\x1c\x0d"


def oru(control_id: str, accession: str = "", study_uid: str = "", findings: str = "Lungs are clear.",
        impression: str = "No acute disease.", report_time: str = "20240105120000", kind: str = "ORU^R01") -> str:
    segments = [
        f"MSH|^~\\&|RIS|HOSP|MMDL|HOSP|{report_time}||{kind}|{control_id}|P|2.5",
        "PID|1||PAT-HL7||Doe^Jane",
        f"OBR|1||{accession}|71045^XR CHEST 2 VIEWS^CPT|||20240105100000|||||||||||||||{report_time}|||F",
    ]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^RIS^Application^DICOM")
    segments += [
        "OBX|1|TX|11329-0^History^LN||Cough for two weeks.||||||F",
        f"OBX|2|TX|59776-5^Findings^LN||{findings}||||||F",
        f"OBX|3|TX|19005-8^Impression^LN||{impression}||||||F",
    ]
    return "\r".join(segments) + "\r"


def mllp_send(port: int, *messages: str, folder: Path) -> list[tuple[str, str]]:
    """Send with the `mllp_send` command line tool; (MSA-1, MSA-3) of each answer."""
    path = folder / f"batch-{free_port()}.hl7"
    path.write_bytes(b"".join(SB + m.encode() + EB for m in messages))
    result = subprocess.run([str(MLLP_SEND), "-p", str(port), "-f", str(path), "127.0.0.1"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = [a for a in result.stdout.split(EB) if a.strip(b"\n")]
    return [msa(a.strip(b"\n").lstrip(SB).decode()) for a in answers]


def msa(ack: str) -> tuple[str, str]:
    segment = next(s for s in ack.split("\r") if s.startswith("MSA|"))
    fields = segment.split("|") + ["", ""]
    return fields[1], fields[3]


@pytest.fixture()
def node(start_node: Callable[..., Node]) -> Node:
    return start_node(hl7={"enabled": True, "host": "127.0.0.1", "port": free_port(), "max_message_kb": 64})


def storescu(node: Node, folder: Path, study_uid: str, accession: str) -> None:
    path = save(dx_synthetic(study_uid, "PAT-HL7", accession, size=64), folder)
    result = dcmtk("storescu", "-aet", "PACS", "-aec", "MMDL_NODE", "127.0.0.1", node.port, path)
    assert result.returncode == 0, result.stderr


def reports(node: Node) -> list[tuple[str, bool, State]]:
    with node.catalog.session() as session:
        return [(r.source_uid, r.current, r.state) for r in session.scalars(select(Report).order_by(Report.id))]


def study_seq(node: Node, study_uid: str) -> int:
    with node.catalog.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        return -1 if study is None or study.dirty or study.vector is None else int(study.index_seq or 0)


def test_report_before_its_study_is_held_joined_embedded_and_replaced_by_a_newer_one(
        node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    study_uid, accession = generate_uid(), "HL7ACC1"
    assert node.hl7 is not None
    assert mllp_send(node.hl7.port, oru("MSG1", accession=accession), folder=tmp_path) == [("AA", "")]
    assert node.catalog.held_report_count() == 1 and reports(node) == []

    storescu(node, tmp_path, study_uid, accession)
    assert node.catalog.held_report_count() == 0
    wait_until(lambda: reports(node) == [("hl7:MSG1", True, State.INDEXED)] and study_seq(node, study_uid) > 0,
               120, "the held report to join its study and be embedded")
    first = study_seq(node, study_uid)

    amended = oru("MSG2", study_uid=study_uid, impression="Small left effusion.", report_time="20240105130000")
    assert mllp_send(node.hl7.port, amended, folder=tmp_path) == [("AA", "")]
    wait_until(lambda: reports(node) == [("hl7:MSG1", False, State.INDEXED), ("hl7:MSG2", True, State.INDEXED)]
               and study_seq(node, study_uid) > first, 120, "the amended report to replace the first")
    with node.catalog.session() as session:
        current = session.scalar(select(Report).where(Report.current.is_(True)))
        assert current.text == "Lungs are clear.\nSmall left effusion."  # findings + impression, not history
    # an older report arriving late is kept but does not become current
    late = oru("MSG0", study_uid=study_uid, report_time="20240105110000")
    assert mllp_send(node.hl7.port, late, folder=tmp_path) == [("AA", "")]
    assert reports(node)[-1] == ("hl7:MSG0", False, State.SKIPPED)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "effusion" not in logged and "Doe" not in logged and "PAT-HL7" not in logged


def test_malformed_messages_get_a_nak_with_the_reason(node: Node, tmp_path: Path) -> None:
    assert node.hl7 is not None
    answers = mllp_send(
        node.hl7.port,
        "this is not hl7",
        oru("B1", accession="A", kind="ADT^A01"),
        oru("", accession="A"),
        "MSH|^~\\&|RIS|HOSP|MMDL|HOSP|20240105||ORU^R01|B3|P|2.5\rPID|1||X\r",
        oru("B4"),
        oru("B5", study_uid="1.2.abc"),
        oru("B6", accession="A", findings="", impression="").replace("Cough for two weeks.", ""),
        oru("B7", accession="A"),
        oru("B7", accession="A"),  # resent: acknowledged, nothing changes
        folder=tmp_path,
    )
    assert [code for code, _ in answers] == ["AR", "AR", "AR", "AE", "AE", "AE", "AE", "AA", "AA"]
    reasons = [reason for _, reason in answers]
    assert "not an HL7 v2 message" in reasons[0]
    assert "unsupported message type ADT\\S\\A01" in reasons[1]  # HL7-escaped ^
    assert "MSH-10" in reasons[2]
    assert "no OBR segment" in reasons[3]
    assert "neither a Study Instance UID" in reasons[4]
    assert "not a valid UID" in reasons[5]
    assert "no report text" in reasons[6]
    assert node.catalog.held_report_count() == 1


def test_oversized_and_unframed_input(node: Node) -> None:
    assert node.hl7 is not None
    with MLLPClient("127.0.0.1", node.hl7.port) as client:
        answer = client.send(b"MSH|no start block" + EB)
        assert msa(answer.strip(SB + EB).decode()) == ("AR", "not an HL7 v2 message (no parsable MSH segment)")
        client.socket.sendall(SB + b"MSH|" + b"x" * (70 * 1024))  # over max_message_kb, never terminated
        client.socket.settimeout(30)
        assert client.socket.recv(100) == b""  # the node closed the connection
    with MLLPClient("127.0.0.1", node.hl7.port) as client:  # and still serves others
        assert msa(client.send_message(oru("C1", accession="Z")).strip(SB + EB).decode())[0] == "AA"


HL7_ALPHABET = "|^~\\&\r MSHPIDOBRXZDSORU01AEadt.0123456789"
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def hl7_node(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> Iterator[Node]:
    from tests.dicom_node.conftest import node_settings

    node = Node(node_settings(tmp_path_factory.mktemp("hl7fuzz"), random_model_dir,
                              hl7={"enabled": True, "host": "127.0.0.1", "port": free_port(), "max_message_kb": 64}))
    node.start()
    yield node
    node.stop()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.text(alphabet=HL7_ALPHABET, max_size=300), cut=st.integers(min_value=0, max_value=400))
def test_fuzz_hl7_parser(hl7_node: Node, noise: str, cut: int) -> None:
    """Random HL7-like text, and real ORU messages with text spliced in: always an ACK, never a crash."""
    valid = oru(f"FZ{cut}", accession=f"FZ{cut}")
    spliced = valid[:cut] + noise + valid[cut + len(noise):]
    assert hl7_node.hl7 is not None
    with MLLPClient("127.0.0.1", hl7_node.hl7.port) as client:
        for message in (noise or "x", spliced or "x"):
            answer = hl7.parse(client.send_message(message).decode("utf-8", errors="replace").strip("\x0b\x1c\r\n"))
            assert str(answer.segment("MSA")[1]) in ("AA", "AE", "AR")


def framed(message: str) -> bytes:
    return SB + message.encode() + EB


@pytest.fixture()
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    yield catalog
    catalog.close()


@pytest.fixture()
def listen(catalog: Catalog) -> Iterator[Callable[..., Hl7Listener]]:
    """Start an MLLP listener (without the DICOM side) with these hl7 settings; stopped after the test."""
    listeners: list[Hl7Listener] = []

    def start(**hl7_settings: object) -> Hl7Listener:
        settings = Hl7Settings(**{"enabled": True, "port": free_port(), **hl7_settings})
        listener = Hl7Listener(settings, catalog, timeout_s=10)
        listener.start()
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        listener.stop()


def test_listener_binds_loopback_by_default_and_admits_loopback(listen: Callable[..., Hl7Listener],
                                                               tmp_path: Path) -> None:
    assert Hl7Settings().host == "127.0.0.1" and Hl7Settings().allowed_hosts == []
    listener = listen()
    assert listener.server.server_address[0] == "127.0.0.1"
    assert mllp_send(listener.port, oru("LB1", accession="LB"), folder=tmp_path) == [("AA", "")]


@pytest.mark.parametrize("allowed", [["127.0.0.1"], ["127.0.0.0/8"], ["localhost"], ["192.0.2.77", "127.0.0.5/32",
                                                                                       "127.0.0.1"]])
def test_listed_sources_are_admitted(listen: Callable[..., Hl7Listener], tmp_path: Path, allowed: list[str]) -> None:
    listener = listen(allowed_hosts=allowed)
    assert mllp_send(listener.port, oru("OK1", accession="OK"), folder=tmp_path) == [("AA", "")]


def test_unlisted_source_is_closed_unread_and_logged(listen: Callable[..., Hl7Listener], catalog: Catalog,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dicom_node.hl7")
    listener = listen(allowed_hosts=["192.0.2.77", "10.20.0.0/16"])  # this test connects from 127.0.0.1
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        try:
            sock.sendall(framed(oru("NO1", accession="NO")))
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
    assert answer == b""
    assert catalog.held_report_count() == 0
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == ["HL7 connection from 127.0.0.1 refused: not in hl7.allowed_hosts"]
    assert "NO1" not in caplog.text and "PAT-HL7" not in caplog.text  # nothing of the message was read


def test_mllp_over_tls(start_node: Callable[..., Node], pki: Path, tmp_path: Path,
                      caplog: pytest.LogCaptureFixture) -> None:
    """[hl7.tls] as the DICOM port's [tls]: a TLS client with a certificate from the CA gets its ACK; plain TCP,
    and a client whose certificate the CA did not sign, are closed without an answer; the node still serves."""
    caplog.set_level(logging.INFO, "dicom_node.hl7")
    node = start_node(hl7={"enabled": True, "port": free_port(),
                           "tls": {"enabled": True, "certificate": str(pki / "server.crt"),
                                   "private_key": str(pki / "server.key"), "ca_certificates": str(pki / "ca.crt")}})
    assert node.hl7 is not None

    def tls_send(client: str) -> bytes:
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
        with socket.create_connection(("127.0.0.1", node.hl7.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            sock.sendall(framed(oru("TLS1", accession="TLSACC")))
            answer = b""
            while not answer.endswith(EB):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer

    def plain_send() -> bytes:
        with socket.create_connection(("127.0.0.1", node.hl7.port), timeout=10) as plain:
            plain.sendall(framed(oru("PLAIN1", accession="PLAIN")))
            return plain.recv(100)

    assert msa(tls_send("client").strip(SB + EB).decode()) == ("AA", "")
    assert node.catalog.held_report_count() == 1
    for refused in (lambda: tls_send("rogue"), plain_send):
        try:
            answer = refused()
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            answer = b""
        assert b"MSA" not in answer
    assert node.catalog.held_report_count() == 1
    assert msa(tls_send("client").strip(SB + EB).decode()) == ("AA", "")  # a resend: acknowledged, nothing new
    handshakes = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(handshakes) == 2 and all(line.startswith("HL7 connection from 127.0.0.1 closed") for line in handshakes)
