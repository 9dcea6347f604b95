"""C-STORE requests read by the upper layer reactor itself (`dicom_node.upper_layer.StoreReceiving`): however a
peer cuts a message into PDVs and packs them into PDUs, each dataset is kept byte for byte under the file meta
pynetdicom writes, and answered; other messages on the same association still reach pynetdicom's service classes;
a command set inside a data set ends the association at once, without storing anything; a C-STORE request of a
class that is not a storage class is aborted as pynetdicom aborts it."""
from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation as DX
from pynetdicom.sop_class import Verification

from bench.dicom_client import associate, read_pdu, release
from dicom_node import upper_layer
from dicom_node.command_sets import command_set
from dicom_node.server import Node
from dicom_node.status import Status
from dicom_node.upper_layer import WRITE_BACK_BYTES
from indexer.durable import start_write_back
from tests.dicom_node.builders import dx_synthetic
from tests.helpers import wait_until

STORE_CONTEXT, ECHO_CONTEXT = 1, 3  # as `associate` numbers them
_COMMAND, _LAST = 0x01, 0x02


def pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def p_data_tf(*values: bytes) -> bytes:
    body = b"".join(values)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def store_command(message_id: int, ds: Dataset, sop_class: str = "") -> bytes:
    request = C_STORE()
    request.MessageID, request.Priority = message_id, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class or ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = BytesIO(b"\0")  # a data set follows (CommandDataSetType)
    return command_set(request)


def echo_command(message_id: int) -> bytes:
    request = C_ECHO()
    request.MessageID, request.AffectedSOPClassUID = message_id, Verification
    return command_set(request)


def response_status(sock: socket.socket) -> int:
    message = DIMSEMessage()
    while True:
        kind, data = read_pdu(sock)
        assert kind == 0x04, f"expected P-DATA-TF, got PDU type 0x{kind:02X}"
        pdu = P_DATA_TF()
        pdu.decode(data)
        if message.decode_msg(pdu.to_primitive()):
            return int(message.command_set.Status)


def image(number: int) -> tuple[Dataset, bytes]:
    ds = dx_synthetic(generate_uid(), f"PAT{number}", f"ACC{number}", size=64, seed=number)
    return ds, encode(ds, True, True)  # Implicit VR Little Endian, as the context was accepted


def test_any_cut_of_a_store_is_kept_byte_for_byte_between_echoes(start_node: Callable[..., Node]) -> None:
    node = start_node(scheduler={"interval_s": 3600})
    images = [image(number) for number in range(1, 4)]
    sock = associate("127.0.0.1", node.port, "MMDL_NODE", DX, others=(Verification,))
    try:
        sock.sendall(p_data_tf(pdv(ECHO_CONTEXT, _COMMAND | _LAST, echo_command(1))))
        assert response_status(sock) == Status.SUCCESS

        # the command set and the whole data set in one PDU, a C-ECHO request after them in the same PDU
        (first, first_bytes), (second, second_bytes), (third, third_bytes) = images
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, store_command(2, first)),
                               pdv(STORE_CONTEXT, _LAST, first_bytes),
                               pdv(ECHO_CONTEXT, _COMMAND | _LAST, echo_command(3))))
        assert [response_status(sock), response_status(sock)] == [Status.SUCCESS, Status.SUCCESS]

        # the data set in 700-byte fragments, three to a PDU, the last PDU short
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, store_command(4, second))))
        fragments = [second_bytes[start:start + 700] for start in range(0, len(second_bytes), 700)]
        values = [pdv(STORE_CONTEXT, _LAST if n == len(fragments) - 1 else 0, f) for n, f in enumerate(fragments)]
        assert len(values) % 3
        for start in range(0, len(values), 3):
            sock.sendall(p_data_tf(*values[start:start + 3]))
        assert response_status(sock) == Status.SUCCESS

        # the command set cut in two PDUs (pynetdicom's path)
        command = store_command(5, third)
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND, command[:10])))
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, command[10:]), pdv(STORE_CONTEXT, _LAST, third_bytes)))
        assert response_status(sock) == Status.SUCCESS

        sock.sendall(p_data_tf(pdv(ECHO_CONTEXT, _COMMAND | _LAST, echo_command(6))))
        assert response_status(sock) == Status.SUCCESS
    finally:
        release(sock)

    for ds, sent in images:
        [(uid, path, sop_class, syntax)] = node.catalog.matching_instances(
            {"StudyInstanceUID": ds.StudyInstanceUID}, "STUDY")
        assert (uid, sop_class, syntax) == (ds.SOPInstanceUID, DX, ImplicitVRLittleEndian)
        kept = node.store.absolute(path).read_bytes()
        assert kept.endswith(sent)
        meta = dcmread(BytesIO(kept)).file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert len(kept) == 132 + 12 + meta.FileMetaInformationGroupLength + len(sent)


def test_a_data_set_written_back_while_it_arrives_is_kept_byte_for_byte(
        start_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch) -> None:
    # 2.9 MB in 4,000-byte fragments, one to a PDU (each smaller than the file's write buffer): each time a MiB
    # more has arrived, all of it is flushed to the file and the kernel asked to start writing it to disk; the fsync
    # before the answer follows
    sizes: list[int] = []

    def recording(fd: int) -> bool:
        sizes.append(os.fstat(fd).st_size)
        return start_write_back(fd)

    monkeypatch.setattr(upper_layer, "start_write_back", recording)
    node = start_node(scheduler={"interval_s": 3600})
    ds = dx_synthetic(generate_uid(), "PAT9", "ACC9", size=1200, seed=9)
    sent = encode(ds, True, True)
    fragment = 4000
    step = -(-WRITE_BACK_BYTES // fragment) * fragment  # the first whole number of fragments reaching a MiB
    assert 2 * step < len(sent) < 3 * step
    sock = associate("127.0.0.1", node.port, "MMDL_NODE", DX)
    try:
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, store_command(1, ds))))
        for start in range(0, len(sent), fragment):
            last = _LAST if start + fragment >= len(sent) else 0
            sock.sendall(p_data_tf(pdv(STORE_CONTEXT, last, sent[start:start + fragment])))
        assert response_status(sock) == Status.SUCCESS
    finally:
        release(sock)
    [(_, path, _, _)] = node.catalog.matching_instances({"StudyInstanceUID": ds.StudyInstanceUID}, "STUDY")
    kept = node.store.absolute(path).read_bytes()
    assert kept.endswith(sent)
    header = len(kept) - len(sent)  # preamble and file meta
    assert sizes == [header + step, header + 2 * step]


def test_a_command_inside_a_data_set_aborts_and_stores_nothing(start_node: Callable[..., Node]) -> None:
    node = start_node(scheduler={"interval_s": 3600})
    ds, sent = image(3)
    sock = associate("127.0.0.1", node.port, "MMDL_NODE", DX)
    try:
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, store_command(1, ds)),
                               pdv(STORE_CONTEXT, 0, sent[:500])))
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, store_command(2, ds))))
        sock.settimeout(10)  # at once, not after a timeout
        kind, _ = read_pdu(sock)
        assert kind == 0x07  # A-ABORT
    finally:
        sock.close()
    assert node.catalog.matching_instances({"StudyInstanceUID": ds.StudyInstanceUID}, "STUDY") == []
    # the node still stores on a new association
    sock = associate("127.0.0.1", node.port, "MMDL_NODE", DX)
    try:
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, store_command(1, ds)),
                               pdv(STORE_CONTEXT, _LAST, sent)))
        assert response_status(sock) == Status.SUCCESS
    finally:
        release(sock)


def test_a_store_request_of_a_class_that_is_not_storage_is_aborted_like_pynetdicom(start_node: Callable[..., Node]) -> None:
    """On an accepted storage context, a C-STORE request naming a SOP class pynetdicom has no storage service for:
    pynetdicom aborts the association, as without the node's own reading; the association's threads end."""
    node = start_node(scheduler={"interval_s": 3600})
    ds, sent = image(5)
    sock = associate("127.0.0.1", node.port, "MMDL_NODE", DX)
    try:
        sock.sendall(p_data_tf(pdv(STORE_CONTEXT, _COMMAND | _LAST, store_command(1, ds, sop_class="1.2.3.4.5")),
                               pdv(STORE_CONTEXT, _LAST, sent)))
        sock.settimeout(10)
        kind, _ = read_pdu(sock)
        assert kind == 0x07  # A-ABORT
    finally:
        sock.close()
    wait_until(lambda: not node.ae.active_associations, 10, "the association's threads to end")
    assert node.catalog.matching_instances({"StudyInstanceUID": ds.StudyInstanceUID}, "STUDY") == []
