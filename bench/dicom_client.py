"""A blocking, single-threaded DICOM client for timing the node alone: one association, one C-FIND, release.

pynetdicom's own requestor polls (its upper layer and the caller both sleep in millisecond steps), so
timing the node through it adds the client's waits to the node's. This client, like a compiled viewer
(dcmtk's findscu, dcm4che's), writes each PDU and blocks in `recv` until the answer is there. It encodes
and decodes with pynetdicom's PDU and DIMSE classes, and sets TCP_NODELAY.
"""
from __future__ import annotations

import socket
import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dsutils import decode, encode
from pynetdicom.dimse_messages import C_FIND_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name (PS3.7 A.2.1)
MAX_PDU = 16382
RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
PENDING = (0xFF00, 0xFF01)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU from the peer: its type and its whole bytes."""
    header = recv_exactly(sock, 6)
    kind, _, length = struct.unpack(">BBL", header)
    return kind, header + recv_exactly(sock, length)


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the node closed the connection")
        data += chunk
    return bytes(data)


def associate(host: str, port: int, called: str, sop_class: str, calling: str = "BENCH",
              others: tuple[str, ...] = ()) -> socket.socket:
    """A connected socket with an association accepted for ``sop_class`` (Implicit VR Little Endian) as
    presentation context 1, and ``others`` as contexts 3, 5, ... (accepted or not)."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = A_ASSOCIATE()
    request.application_context_name = APPLICATION_CONTEXT
    request.calling_ae_title, request.called_ae_title = calling, called
    contexts = [build_context(uid, ImplicitVRLittleEndian) for uid in (sop_class, *others)]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    request.presentation_context_definition_list = contexts
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = MAX_PDU
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    request.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    sock.sendall(pdu.encode())
    kind, _ = read_pdu(sock)
    if kind != 0x02:
        sock.close()
        raise ConnectionError(f"association not accepted (PDU type 0x{kind:02X})")
    return sock


def find(sock: socket.socket, sop_class: str, identifier: Dataset) -> list[Dataset]:
    """One C-FIND on context 1: the identifiers of its pending responses, in order."""
    request = C_FIND()
    request.MessageID, request.AffectedSOPClassUID, request.Priority = 1, sop_class, 2
    request.Identifier = BytesIO(encode(identifier, True, True))  # Implicit VR Little Endian
    message = C_FIND_RQ()
    message.primitive_to_message(request)
    for p_data in message.encode_msg(1, MAX_PDU):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        sock.sendall(pdu.encode())
    answers: list[Dataset] = []
    response = DIMSEMessage()
    while True:
        kind, data = read_pdu(sock)
        if kind != 0x04:
            raise ConnectionError(f"expected P-DATA, got PDU type 0x{kind:02X}")
        pdu = P_DATA_TF()
        pdu.decode(data)
        if not response.decode_msg(pdu.to_primitive()):
            continue
        status = response.command_set.Status
        if status not in PENDING:
            return answers
        answers.append(decode(response.message_to_primitive().Identifier, True, True))
        response = DIMSEMessage()


def release(sock: socket.socket) -> None:
    """A-RELEASE-RQ, wait for the A-RELEASE-RP, close."""
    sock.sendall(RELEASE_RQ)
    kind, _ = read_pdu(sock)
    sock.close()
    if kind != 0x06:
        raise ConnectionError(f"expected A-RELEASE-RP, got PDU type 0x{kind:02X}")
