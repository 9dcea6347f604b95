"""DIMSE command sets written straight to bytes, for the messages the node sends, and the file meta of the
datasets it receives.

pynetdicom builds each message's command set as a pydicom Dataset (a deep copy of a template per message,
every value validated as it is set) and encodes it twice, once to learn the group length and once to send it:
~0.35 ms of CPU for a 100-byte C-FIND-RSP or C-STORE-RSP before its second encoding (timed in process), where
writing it here takes ~10 us. A command set is always Implicit VR Little Endian (PS3.7 6.3.1) and holds a few
element types, so it is written here directly, elements in tag order, the group length first, exactly the bytes
pynetdicom writes (`tests/dicom_node/test_command_sets.py` compares them for every message type). A value this
module does not write (a text outside ASCII) leaves the message to pynetdicom.

`EncodingDIMSE` sends with it, fragmenting the bytes written into P-DATA itself (pynetdicom's fragmenting
would encode the command set once more); the message handed to the `EVT_DIMSE_SENT` handlers is the usual
pynetdicom message class, its command set decoded from the bytes sent.

`file_header` writes the preamble and file meta pynetdicom writes before a received C-STORE data set (pydicom's
writer takes ~0.5 ms for it; the same bytes here, compared in the tests).
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS, _DATASET_KEYWORDS, _MESSAGE_TYPES, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

_NO_DATA_SET, _DATA_SET = 0x0101, 0x0001
_DATA, _COMMAND, _LAST = 0x00, 0x01, 0x02  # message control header bits of a PDV (PS3.8 E.2)
_COMMAND_FIELD = {name: field for field, (name, _) in _MESSAGE_TYPES.items()}


class NotWritten(ValueError):
    """A value `command_set` does not write; pynetdicom encodes that message itself."""


def _text(value: Any, padding: bytes) -> bytes:
    try:
        data = str(value).encode("ascii")
    except UnicodeEncodeError:
        raise NotWritten("text outside ASCII") from None
    return data + padding if len(data) % 2 else data


def _tags(value: Any) -> bytes:
    tags = value if isinstance(value, (list, tuple)) else [value]
    return b"".join(struct.pack("<HH", tag >> 16, tag & 0xFFFF) for tag in tags)


# How each value representation of the command group is written (PS3.5 6.2, Little Endian).
_WRITERS = {
    "US": lambda value: struct.pack("<H", value),
    "UL": lambda value: struct.pack("<L", value),
    "UI": lambda value: _text(value, b"\x00"),
    "AE": lambda value: _text(value, b" "),
    "LO": lambda value: _text(value, b" "),
    "AT": _tags,
}

# Per message type: (keyword, tag, writer) of its command elements after the group length, in tag order.
_LAYOUTS = {
    name: sorted(
        ((keyword, tag, _WRITERS[dictionary_VR(tag)])
         for keyword, tag in ((keyword, tag_for_keyword(keyword)) for keyword in keywords)
         if keyword != "CommandGroupLength"),
        key=lambda item: item[1],
    )
    for name, keywords in _COMMAND_SET_KEYWORDS.items()
}


def message_class(primitive: Any) -> type[DIMSEMessage]:
    """The DIMSE message a primitive is sent as (pynetdicom's choice: a request unless it answers one)."""
    table = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE
    return table[type(primitive)]  # type: ignore[index]


def has_data_set(primitive: Any, name: str) -> bool:
    keyword = _DATASET_KEYWORDS.get(name.replace("-", "_"))
    return bool(keyword and getattr(primitive, keyword)) or bool(getattr(primitive, "_dataset_path", None))


def command_set(primitive: Any) -> bytes:
    """The Implicit VR Little Endian command set of the message ``primitive`` is sent as: the elements of its
    type whose parameter is set (a parameter the primitive does not have is written empty, as pynetdicom does),
    preceded by the group length. NotWritten when a value is not one written here."""
    name = message_class(primitive).__name__.replace("_", "-")
    elements = bytearray()
    for keyword, tag, write in _LAYOUTS[name]:
        if keyword == "CommandField":
            value: Any = _COMMAND_FIELD[name]
        elif keyword == "CommandDataSetType":
            value = _DATA_SET if has_data_set(primitive, name) else _NO_DATA_SET
        elif hasattr(primitive, keyword):
            value = getattr(primitive, keyword)
            if value is None:
                continue
        else:
            value = None
        data = b"" if value is None else write(value)
        elements += struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(data)) + data
    return struct.pack("<HHLL", 0, 0, 4, len(elements)) + elements


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """An element with a 2-byte length, Explicit VR Little Endian."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The 128-byte preamble, "DICM" and the file meta information (PS3.10 7.1) pynetdicom writes before a
    C-STORE data set it receives: its implementation class UID and version name. NotWritten when a UID is not
    one ASCII value."""
    if not all(isinstance(uid, str) for uid in (sop_class_uid, sop_instance_uid, transfer_syntax)):
        raise NotWritten("a UID of several values")
    elements = b"".join((
        struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        _explicit(0x0002, 0x0002, b"UI", _text(sop_class_uid, b"\x00")),
        _explicit(0x0002, 0x0003, b"UI", _text(sop_instance_uid, b"\x00")),
        _explicit(0x0002, 0x0010, b"UI", _text(transfer_syntax, b"\x00")),
        _explicit(0x0002, 0x0012, b"UI", _text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _explicit(0x0002, 0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\x00" * 128 + b"DICM" + _explicit(0x0002, 0x0000, b"UL", struct.pack("<L", len(elements))) + elements


def p_data(context_id: int, command: bytes, data_set: bytes, max_pdu: int) -> Iterator[P_DATA]:
    """A message as P-DATA primitives (PS3.8 E.2): the command set's fragments, then the data set's, each PDV
    at most ``max_pdu`` bytes with its headers (0: unlimited), the last of each part flagged so. Consecutive PDVs
    share one P-DATA, so one PDU, while they fit in ``max_pdu``: a short answer (command set and identifier)
    goes out as one PDU where pynetdicom sends two."""
    size = max_pdu - 6 if max_pdu else max(len(command), len(data_set))
    primitive, used = P_DATA(), 0
    for part, flags in ((command, _COMMAND), (data_set, _DATA)):
        starts = range(0, len(part), size)
        for start in starts:
            value = bytes((flags | (_LAST if start == starts[-1] else 0),)) + part[start:start + size]
            item = 5 + len(value)  # the PDV item: its length (4 bytes), the context ID, the value
            if max_pdu and used + item > max_pdu:
                yield primitive
                primitive, used = P_DATA(), 0
            primitive.presentation_data_value_list.append((context_id, value))
            used += item
    yield primitive


class EncodingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE service provider, sending command sets written by `command_set`. A message whose data
    set is read from its file as it is sent (a C-STORE sub-operation of C-GET or C-MOVE) is fragmented by
    pynetdicom, which reads the file; the others here."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        try:
            encoded = command_set(primitive)
        except (NotWritten, KeyError, struct.error):
            super().send_msg(primitive, context_id)
            return
        message = DIMSEMessage()
        message.__class__ = message_class(primitive)  # as pynetdicom's own decoding does
        message.context_id = context_id
        message.command_set = decode(BytesIO(encoded), True, True)
        keyword = _DATASET_KEYWORDS.get(type(message).__name__)
        message.data_set = (getattr(primitive, keyword) if keyword else None) or BytesIO()
        message._data_set_path = getattr(primitive, "_dataset_path", None)
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        if message._data_set_path is None:
            fragments = p_data(context_id, encoded, message.data_set.getvalue(), self.maximum_pdu_size)
        else:
            fragments = message.encode_msg(context_id, self.maximum_pdu_size)
        for fragment in fragments:
            self.dul.send_pdu(fragment)
