"""The node's acceptors wait on their sockets instead of polling them (dicom_node/upper_layer.py): an idle
association costs (almost) no CPU, every answer of a long C-FIND still arrives in order, an association
request that never comes and a peer that falls silent are still timed out, and a PDU is read whole.

The speed these buy is measured by `python -m bench.query` (docs/BENCHMARKS.md), not here."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import Verification

from bench.dicom_client import associate, find, release
from dicom_node.server import Node
from dicom_node.upper_layer import LargeReadSocket, WaitingAssociation, WaitingDUL
from tests.helpers import dcmtk


def test_accepted_associations_wait_instead_of_polling(start_node: Callable[..., Node]) -> None:
    """Four idle associations: pynetdicom's polling reactors burn ~135 ms of CPU per second on them here
    (8 threads waking every millisecond); the node's waiting ones a few."""
    node = start_node(scheduler={"interval_s": 3600})
    sockets = [associate("127.0.0.1", node.port, "MMDL_SIMILAR", Verification) for _ in range(4)]
    try:
        accepted = [a for a in node.ae.active_associations if not a.is_requestor]
        assert len(accepted) == 4
        assert all(isinstance(a, WaitingAssociation) and isinstance(a.dul, WaitingDUL) for a in accepted)
        assert all(isinstance(a.dul.socket, LargeReadSocket) for a in accepted)
        time.sleep(0.3)
        cpu = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu < 0.06
    finally:
        for sock in sockets:
            release(sock)


def test_every_answer_of_a_long_find_arrives_in_order(start_node: Callable[..., Node], studies) -> None:
    """Responses are sent as the handler yields them, each once, in order, then the final status."""
    node = start_node(scheduler={"interval_s": 3600})
    dcmtk("storescu", "-aec", "MMDL_NODE", "127.0.0.1", str(node.port), *[str(s["image"]) for s in studies])
    sock = associate("127.0.0.1", node.port, "MMDL_NODE", FIND)
    try:
        for _ in range(20):  # one association, many requests back to back
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = ""
            query.StudyDate = ""
            answers = find(sock, FIND, query)
            assert sorted(a.StudyInstanceUID for a in answers) == sorted(s["uid"] for s in studies)
    finally:
        release(sock)


def test_a_connection_that_never_asks_is_closed_after_the_acse_timeout(start_node: Callable[..., Node]) -> None:
    node = start_node(node={"acse_timeout_s": 0.5})
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the node, with nothing sent
        assert time.monotonic() - started < 5


def test_a_silent_peer_is_aborted_after_the_network_timeout(start_node: Callable[..., Node]) -> None:
    node = start_node(node={"network_timeout_s": 0.5})
    ae = AE("VIEWER")
    ae.add_requested_context(Verification)
    aborted = threading.Event()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_SIMILAR",
                         evt_handlers=[(evt.EVT_ABORTED, lambda _: aborted.set())])
    assert assoc.is_established
    assert aborted.wait(10), "the node did not abort an association idle past its network timeout"


@pytest.mark.parametrize("closed_early", [False, True])
def test_a_pdu_is_read_whole_or_up_to_the_peer_closing(closed_early: bool) -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB, written in pieces as a network delivers it
    wrapped = LargeReadSocket(Association(AE(), "acceptor"), client_socket=ours)

    def write() -> None:
        sent = payload[: len(payload) // 2] if closed_early else payload
        for start in range(0, len(sent), 60_000):
            peer.sendall(sent[start:start + 60_000])
        peer.close()

    writer = threading.Thread(target=write)
    writer.start()
    data = wrapped.recv(len(payload))
    writer.join()
    ours.close()
    assert bytes(data) == (payload[: len(payload) // 2] if closed_early else payload)
