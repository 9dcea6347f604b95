"""Receiver processes: storage associations handed to them are stored, counted and indexed as the node's own; every
other association stays with the node; a receiver that dies leaves its share to the node."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from dicom_node.receivers import associate_request, receiver_serves
from dicom_node.server import Node
from indexer.catalog import Catalog
from indexer.schema import Instance
from tests.dicom_node.builders import dx_synthetic, save
from tests.dicom_node.peers import find, indexed, study_query
from tests.helpers import dcmtk, dcmtk_env, free_port, wait_until


def request_bytes(called: str) -> bytes:
    """The A-ASSOCIATE-RQ dcmtk's echoscu sends, captured on a bare listening socket."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        echoscu = subprocess.Popen(["echoscu", "-aec", called, "127.0.0.1", str(server.getsockname()[1])],
                                   env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        connection, _ = server.accept()
        with connection:
            connection.settimeout(10)
            data = connection.recv(6)
            while len(data) < 6 + int.from_bytes(data[2:6], "big"):
                data += connection.recv(65536)
        echoscu.wait(30)
    return data


def test_the_request_is_read_by_a_peek_and_left_in_the_socket() -> None:
    data = request_bytes("MMDL_NODE")
    ours, peer = socket.socketpair()
    with ours, peer:
        threading.Timer(0.05, peer.sendall, [data[3:]]).start()  # the request arrives in two parts
        peer.sendall(data[:3])
        request = associate_request(ours, timeout_s=5)
        assert request is not None and request.called_ae_title == "MMDL_NODE"
        assert receiver_serves(request, "MMDL_NODE") and not receiver_serves(request, "MMDL_SIMILAR")
        ours.settimeout(5)
        assert ours.recv(len(data), socket.MSG_WAITALL) == data  # still there for whoever serves it
        peer.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-ABORT first: not a request
        assert associate_request(ours, timeout_s=1) is None
        ours.recv(64)
        started = time.monotonic()
        assert associate_request(ours, timeout_s=0.3) is None  # nothing comes
        assert time.monotonic() - started < 2


def storescu(node: Node, files: list[Path], calling: str = "PACS") -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", "-aet", calling, "-aec", "MMDL_NODE", "127.0.0.1", node.port, *files)


def health(port: int) -> tuple[int, str]:
    """/health's status code and receivers field."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        return response.status, json.loads(response.read())["receivers"]


def handed(node: Node, count: int) -> bool:
    """Whether ``count`` connections were handed to receivers (counted just after each hand-off: wait for it)."""
    assert node.receivers is not None
    wait_until(lambda: node.receivers is not None and node.receivers.handed >= count, 10, f"{count} hand-offs")
    return node.receivers.handed == count


def failures(node: Node, reason: str) -> float:
    return node.metrics.registry.get_sample_value("mmdl_failures_total", {"reason": reason}) or 0.0


def test_storage_associations_are_received_by_receivers(start_node: Callable[..., Node], tmp_path: Path) -> None:
    node = start_node(node={"receivers": 2}, access={"allowed_calling_aets": ["PACS", "VIEWER"]})
    assert node.receivers is not None
    wait_until(lambda: len(node.receivers.ready()) == 2, 60, "both receivers ready")
    batches = [[save(dx_synthetic(generate_uid(), f"RCV{b}", f"R{b}-{i}", seed=10 * b + i), tmp_path / str(b))
                for i in range(6)] for b in range(2)]
    results: list[subprocess.CompletedProcess[str]] = []
    senders = [threading.Thread(target=lambda files=files: results.append(storescu(node, files))) for files in batches]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert [result.returncode for result in results] == [0, 0], [result.stderr for result in results]
    assert handed(node, 2)

    sent = {path.stem for files in batches for path in files}
    with node.catalog.session() as session:
        rows = {row.sop_uid: row for row in session.query(Instance)}
        assert set(rows) == sent
        syntaxes = {row.transfer_syntax for row in rows.values()}
    assert all(dcmread(node.store.absolute(rows[path.stem].path)) == dcmread(path)
               for files in batches for path in files)
    # the receivers' stores in the node's counters and its held syntaxes (reported as they answer)
    wait_until(lambda: node.metrics.registry.get_sample_value(
        "mmdl_received_instances_total", {"calling_ae": "PACS"}) == 12, 10, "the counters reported")
    assert len(syntaxes) == 1
    wait_until(lambda: node.services.held.only(DigitalXRayImageStorageForPresentation) in syntaxes, 10,
               "the held syntax reported")
    wait_until(indexed(node, 12), 120, "the received studies indexed by the node")

    answers, final = find(node, study_query(PatientID="RCV1"), called="MMDL_NODE")  # query: the node serves it
    assert final.Status == 0 and len(answers) == 6
    assert dcmtk("echoscu", "-aet", "PACS", "-aec", "MMDL_SIMILAR", "127.0.0.1", node.port).returncode == 0
    assert handed(node, 2)
    assert dcmtk("echoscu", "-aet", "PACS", "-aec", "MMDL_NODE", "127.0.0.1", node.port).returncode == 0
    assert handed(node, 3)  # verification alone: a receiver answers it

    stranger = save(dx_synthetic(generate_uid(), "RCV9", "R9", seed=99), tmp_path / "stranger")
    assert storescu(node, [stranger], calling="STRANGER").returncode != 0  # the receiver applies the policy
    assert handed(node, 4)
    with node.catalog.session() as session:
        assert session.query(Instance).filter_by(sop_uid=stranger.stem).count() == 0
    assert failures(node, "receiver_exit") == 0

    pids = node.receivers.ready()
    node.stop()
    for pid in pids:  # stopped with the node, and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_receiver_that_dies_leaves_its_share_to_the_node(start_node: Callable[..., Node], tmp_path: Path) -> None:
    http_port = free_port()
    node = start_node(node={"receivers": 1}, metrics={"enabled": True, "host": "127.0.0.1", "port": http_port})
    assert node.receivers is not None
    wait_until(lambda: len(node.receivers.ready()) == 1, 60, "the receiver ready")
    assert health(http_port) == (200, "1/1 ready")
    first = save(dx_synthetic(generate_uid(), "DIE1", "D1", seed=1), tmp_path)
    assert storescu(node, [first]).returncode == 0 and handed(node, 1)
    held = AE("PACS")
    held.add_requested_context(Verification)
    open_association = held.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")  # handed over, left open
    assert open_association.is_established and handed(node, 2)
    wait_until(lambda: node.associations() == 1, 10, "the first association reported done, the open one counted")
    os.kill(node.receivers.ready()[0], signal.SIGKILL)
    wait_until(lambda: not node.receivers.ready(), 30, "the node to notice")
    # what the receiver served ended with it: nothing of it is left counted against max_associations
    wait_until(lambda: node.associations() == 0, 10, "the receiver's associations no longer counted")
    assert failures(node, "receiver_exit") == 1
    assert health(http_port) == (200, "0/1 ready")  # reported, not unhealthy: the node serves its share
    second = save(dx_synthetic(generate_uid(), "DIE2", "D2", seed=2), tmp_path)
    assert storescu(node, [second]).returncode == 0 and handed(node, 2)
    with node.catalog.session() as session:
        assert {row.sop_uid for row in session.query(Instance)} == {first.stem, second.stem}


def test_a_stopping_node_lets_its_receivers_finish_their_associations(start_node: Callable[..., Node],
                                                                       tmp_path: Path) -> None:
    """The node stops while a receiver is storing: the receiver finishes the association (within its grace) and
    every instance it answered is stored and counted; none is answered with a failure."""
    node = start_node(node={"receivers": 1})
    assert node.receivers is not None
    wait_until(lambda: len(node.receivers.ready()) == 1, 60, "the receiver ready")
    files = [save(dx_synthetic(generate_uid(), f"STOP{i}", f"S{i}", size=1024, seed=i), tmp_path) for i in range(30)]
    sender = subprocess.Popen(["storescu", "-v", "-aec", "MMDL_NODE", "127.0.0.1", str(node.port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
    wait_until(lambda: len(node.catalog.pending_images(100)) >= 3, 60, "the receiver storing")
    counter = node.metrics.registry
    node.stop()
    log = sender.communicate(timeout=120)[0]
    assert sender.returncode == 0, log[-2000:]
    assert log.count("Received Store Response (") == log.count("Received Store Response (Success)") == 30
    catalog = Catalog(node.settings.catalog_url)
    try:
        with catalog.session() as session:
            assert {row.sop_uid for row in session.query(Instance)} == {path.stem for path in files}
    finally:
        catalog.close()
    assert counter.get_sample_value("mmdl_received_instances_total", {"calling_ae": "STORESCU"}) == 30


def test_a_stalled_receiver_does_not_hold_new_associations(start_node: Callable[..., Node], tmp_path: Path) -> None:
    """A receiver that stops taking connections (here SIGSTOP) holds those already handed to it; once its channel is
    full, the node serves new associations itself instead of waiting on it. Resumed, it serves those it holds.
    (Those it holds count as associations: the limit is set above the 40 opened here.)"""
    node = start_node(node={"receivers": 1, "max_associations": 100})
    assert node.receivers is not None
    wait_until(lambda: len(node.receivers.ready()) == 1, 60, "the receiver ready")
    pid = node.receivers.ready()[0]
    request = request_bytes("MMDL_NODE")
    os.kill(pid, signal.SIGSTOP)
    held = []
    try:
        for _ in range(40):  # more than its channel holds (6)
            held.append(socket.create_connection(("127.0.0.1", node.port)))
            held[-1].sendall(request)

        def answered_by_the_node() -> list[socket.socket]:
            return select.select(held, [], [], 0)[0]

        wait_until(lambda: node.receivers is not None
                   and node.receivers.handed + len(answered_by_the_node()) == len(held), 30, "every request placed")
        assert 0 < node.receivers.handed < len(held)
        image = save(dx_synthetic(generate_uid(), "STALL1", "ST1", seed=1), tmp_path)
        assert storescu(node, [image]).returncode == 0  # not held: dcmtk's ACSE timeout would fail it
        with node.catalog.session() as session:
            assert session.query(Instance).filter_by(sop_uid=image.stem).count() == 1
        waiting = [connection for connection in held if connection not in answered_by_the_node()]
    finally:
        os.kill(pid, signal.SIGCONT)
    for connection in waiting:  # handed to the receiver while it was stopped: answered once it goes on
        connection.settimeout(30)
        assert connection.recv(1) == b"\x02"  # A-ASSOCIATE-AC
    for connection in held:
        connection.close()
    assert failures(node, "receiver_exit") == 0
