"""Who may talk and what the node refuses: TLS with dcmtk as the client, host checks, limits, watermark."""
from __future__ import annotations

import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from dicom_node.server import Node
from dicom_node.status import Status
from tests.dicom_node.builders import dx_from_png, dx_synthetic, save
from tests.dicom_node.peers import FIND
from tests.helpers import dcmtk, wait_until


def test_tls_with_client_certificates(start_node: Callable[..., Node], pki: Path) -> None:
    node = start_node(tls={"enabled": True, "certificate": str(pki / "server.crt"),
                           "private_key": str(pki / "server.key"), "ca_certificates": str(pki / "ca.crt")})
    ok = dcmtk("echoscu", "+tls", pki / "client.key", pki / "client.crt", "+cf", pki / "ca.crt",
               "-aec", "MMDL_NODE", "127.0.0.1", node.port)
    assert ok.returncode == 0, ok.stderr
    rogue = dcmtk("echoscu", "+tls", pki / "rogue.key", pki / "rogue.crt", "+cf", pki / "ca.crt",
                  "-aec", "MMDL_NODE", "127.0.0.1", node.port)
    assert rogue.returncode != 0
    plain = dcmtk("echoscu", "-to", "5", "-ta", "5", "-aec", "MMDL_NODE", "127.0.0.1", node.port)
    assert plain.returncode != 0
    # The node still serves TLS clients after refusing the others.
    assert dcmtk("echoscu", "+tls", pki / "client.key", pki / "client.crt", "+cf", pki / "ca.crt",
                 "-aec", "MMDL_NODE", "127.0.0.1", node.port).returncode == 0


def test_peer_host_check(start_node: Callable[..., Node]) -> None:
    node = start_node(peers=[{"ae_title": "LOCALPACS", "host": "127.0.0.1", "port": 104, "check_host": True},
                             {"ae_title": "FARPACS", "host": "192.0.2.10", "port": 104, "check_host": True}])
    assert dcmtk("echoscu", "-aet", "LOCALPACS", "-aec", "MMDL_NODE", "127.0.0.1", node.port).returncode == 0
    spoofed = dcmtk("echoscu", "-aet", "FARPACS", "-aec", "MMDL_NODE", "127.0.0.1", node.port)
    assert spoofed.returncode != 0 and "Calling AE Title Not Recognized" in spoofed.stderr


def test_disk_watermark_refuses_stores_and_new_associations(start_node: Callable[..., Node], shared_data: Path,
                                                           tmp_path: Path) -> None:
    node = start_node()
    png = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[0]
    image = save(dx_from_png(png, "1.2.3.4", "P1", "A1"), tmp_path)
    ae = AE("PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert assoc.is_established
    node.store.min_free_bytes = 2**62  # as if the disk had filled up during the association
    assert assoc.send_c_store(image).Status == Status.OUT_OF_RESOURCES
    assoc.release()
    assert not list((node.settings.node.data_dir / "storage").rglob("*.dcm"))
    refused = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert refused.is_rejected
    node.store.min_free_bytes = 0
    again = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert again.is_established and again.send_c_store(image).Status == Status.SUCCESS
    again.release()


@pytest.mark.parametrize("receivers", [0, 1])
def test_association_limit(start_node: Callable[..., Node], receivers: int) -> None:
    """node.max_associations is the node's limit: with a receiver process, the associations handed to it count
    too. The next association, handed over or kept by the node, is refused as over the local limit."""
    node = start_node(node={"max_associations": 3, "receivers": receivers})
    if node.receivers is not None:
        wait_until(lambda: len(node.receivers.ready()) == receivers, 60, "the receiver ready")
    echo, query = AE("PACS"), AE("VIEWER")
    echo.add_requested_context(Verification)  # what a receiver serves
    query.add_requested_context(FIND)  # what the node keeps
    held = [echo.associate("127.0.0.1", node.port, ae_title="MMDL_NODE") for _ in range(2)]
    held.append(query.associate("127.0.0.1", node.port, ae_title="MMDL_NODE"))
    assert all(a.is_established for a in held)
    assert node.receivers is None or node.receivers.handed == 2
    for ae in (echo, query):
        extra = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
        assert extra.is_rejected
        assert (extra.acceptor.primitive.result, extra.acceptor.primitive.result_source,
                extra.acceptor.primitive.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    assert node.receivers is None or node.receivers.handed == 2  # the one refused was not handed over
    for assoc in held:
        assoc.release()
    wait_until(lambda: node.associations() == 0, 30, "the associations counted as ended")
    after = [echo.associate("127.0.0.1", node.port, ae_title="MMDL_NODE") for _ in range(3)]
    assert all(a.is_established and a.send_c_echo().Status == 0 for a in after)
    assert node.receivers is None or node.receivers.handed == 5
    for assoc in after:
        assoc.release()


@pytest.mark.parametrize("receivers", [0, 1])
def test_idle_and_trickling_associations_are_closed(start_node: Callable[..., Node], receivers: int) -> None:
    """Closed by the node's watchdog, or by a receiver process' own for the associations handed to it."""
    node = start_node(node={"message_timeout_s": 1.0, "receivers": receivers})
    if node.receivers is not None:
        wait_until(lambda: len(node.receivers.ready()) == receivers, 60, "the receiver ready")
    ae = AE("SLOW")
    ae.add_requested_context(Verification)
    idle = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    trickle = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert idle.is_established and trickle.is_established
    raw = trickle.dul.socket.socket
    raw.sendall(bytes([0x04, 0x00, 0x00, 0x00, 0x10, 0x00]))  # a P-DATA-TF promising 1 MiB ...
    deadline = time.monotonic() + 30
    while (idle.is_established or trickle.is_established) and time.monotonic() < deadline:
        try:
            raw.sendall(b"\x00")  # ... that arrives one byte at a time
        except OSError:
            pass
        time.sleep(0.2)
    assert idle.is_aborted and not trickle.is_established
    assert node.watchdog.aborted == (0 if receivers else 2)
    assert node.receivers is None or node.receivers.handed == 2
    fresh = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert fresh.is_established and fresh.send_c_echo().Status == 0
    fresh.release()


def test_a_transfer_cut_short_leaves_nothing_behind(start_node: Callable[..., Node]) -> None:
    """A peer that sends part of a dataset and stops: the association is aborted and the partial file,
    which may hold patient data, is deleted from the incoming folder."""
    node = start_node(node={"message_timeout_s": 1.0})
    ds = dx_synthetic(generate_uid(), "PAT-CUT", "ACC-CUT", size=256)
    ae = AE("PACS")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = []
    for primitive in message.encode_msg(assoc.accepted_contexts[0].context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    assert len(pdus) > 3
    for pdu in pdus[:-2]:  # the command and most of the dataset, never its last fragments
        assoc.dul.socket.socket.sendall(pdu)
    incoming = node.store.incoming
    wait_until(lambda: any(incoming.glob("*.dcm")), 30, "the partial dataset to be written")
    wait_until(lambda: not assoc.is_established, 30, "the stalled association to be aborted")
    wait_until(lambda: not any(incoming.glob("*.dcm")), 30, "the partial file to be deleted")
    assert node.catalog.find_instance_study(str(ds.SOPInstanceUID)) is None
