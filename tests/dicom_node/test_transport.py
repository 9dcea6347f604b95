"""The node's TCP connections send each PDU at once (TCP_NODELAY), accepted ones and its C-MOVE ones.

Without it, a DIMSE message written as several PDUs waits ~40 ms for the peer's delayed ACK; a viewer
would see every similar-case query slowed by that much."""
from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, StudyRootQueryRetrieveInformationModelMove

from dicom_node.server import Node
from dicom_node.status import Status
from tests.dicom_node.builders import dx_from_pixels, save
from tests.helpers import dcmtk, free_port


def no_delay(assoc: Association) -> int:
    return assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_accepted_connections_have_nagle_off(start_node: Callable[..., Node]) -> None:
    node = start_node()
    ae = AE("VIEWER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_SIMILAR")
    assert assoc.is_established
    try:
        accepted = [a for a in node.ae.active_associations if not a.is_requestor]
        assert accepted and all(no_delay(a) for a in accepted)
    finally:
        assoc.release()


def test_move_connections_have_nagle_off(start_node: Callable[..., Node], tmp_path: Path) -> None:
    peer_port = free_port()
    node = start_node(peers=[{"ae_title": "WORKSTATION", "host": "127.0.0.1", "port": peer_port}])
    pixels = np.zeros((64, 64), dtype=np.uint16)
    study_uid = generate_uid()
    image = save(dx_from_pixels(pixels, study_uid, "PAT-T", "ACC-T"), tmp_path)
    assert dcmtk("storescu", "-aec", "MMDL_NODE", "127.0.0.1", node.port, image).returncode == 0

    seen: list[int] = []

    def on_store(event: evt.Event) -> int:  # runs while the node's C-MOVE association is open
        seen.extend(no_delay(a) for a in node.ae.active_associations if a.is_requestor)
        return Status.SUCCESS

    workstation = AE("WORKSTATION")
    workstation.add_supported_context(DigitalXRayImageStorageForPresentation)
    server = workstation.start_server(("127.0.0.1", peer_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        viewer = AE("VIEWER")
        viewer.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = viewer.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        statuses = [s.Status for s, _ in assoc.send_c_move(query, "WORKSTATION", StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
    finally:
        server.shutdown()
    assert statuses[-1] == Status.SUCCESS
    assert seen == [1]
