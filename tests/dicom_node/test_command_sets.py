"""The command sets the node writes itself (dicom_node/command_sets.py) are byte for byte pynetdicom's, for
every DIMSE message type and every parameter; so are their P-DATA fragments; and a value it does not write
still goes out, encoded by pynetdicom. Over the wire, every C-FIND, C-STORE, C-GET and C-MOVE test of the
node goes through it too. The file meta written before a received data set is pynetdicom's too."""
from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import dimse_primitives
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from dicom_node.command_sets import NotWritten, command_set, file_header, message_class, p_data

ODD_UID, EVEN_UID = "1.2.840.10008.5.1.4.1.1.1", "1.2.826.0.1.3680043.2.1"
VALUES = {"US": 7, "UI": ODD_UID, "AE": "DEST1", "LO": "odd comment", "AT": [0x00100010, 0x0020000D]}
VALUES_BY_KEYWORD = {"Priority": 2, "Status": 0xFF00, "AffectedSOPInstanceUID": EVEN_UID, "OffendingElement": [0x00100010]}
# Every message pynetdicom sends: (primitive class, whether it is the response).
MESSAGES = [*((cls, False) for cls in _RQ_TO_MESSAGE), *((cls, True) for cls in _RSP_TO_MESSAGE)]


def pynetdicom_command_set(primitive: object) -> bytes:
    message = message_class(primitive)()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def filled(cls: type, response: bool, with_data_set: bool) -> object:
    """A primitive of ``cls`` with every parameter of its message type set (a request or a response)."""
    primitive = cls()
    if response:
        primitive.MessageIDBeingRespondedTo = 3
    name = message_class(primitive).__name__.replace("_", "-")
    for keyword in _COMMAND_SET_KEYWORDS[name]:
        if keyword == "MessageIDBeingRespondedTo" or not hasattr(primitive, keyword):
            continue
        value = VALUES_BY_KEYWORD.get(keyword, VALUES[dictionary_VR(tag_for_keyword(keyword))])
        setattr(primitive, keyword, value)
    for keyword in ("Identifier", "DataSet", "AttributeList", "EventInformation", "EventReply", "ActionInformation",
                    "ActionReply", "ModificationList"):
        if with_data_set and hasattr(primitive, keyword):
            setattr(primitive, keyword, BytesIO(b"\x10\x00\x10\x00\x04\x00\x00\x00Doe "))
    return primitive


@pytest.mark.parametrize(("cls", "response"), MESSAGES,
                         ids=[f"{cls.__name__}-{'response' if response else 'request'}" for cls, response in MESSAGES])
@pytest.mark.parametrize("with_data_set", [False, True], ids=["no-data-set", "data-set"])
def test_every_message_type_written_as_pynetdicom_writes_it(cls: type, response: bool, with_data_set: bool) -> None:
    primitive = filled(cls, response, with_data_set)
    assert command_set(primitive) == pynetdicom_command_set(primitive)


def test_unset_parameters_left_out_and_even_uids_unpadded() -> None:
    """A bare C-FIND-RSP: only the elements whose parameters are set (no ErrorComment, no AffectedSOPClassUID)."""
    answer = dimse_primitives.C_FIND()
    answer.MessageIDBeingRespondedTo, answer.Status = 1, 0x0000
    assert command_set(answer) == pynetdicom_command_set(answer)
    answer.AffectedSOPClassUID = EVEN_UID
    assert command_set(answer) == pynetdicom_command_set(answer)


def test_text_outside_ascii_is_left_to_pynetdicom() -> None:
    refusal = dimse_primitives.C_FIND()
    refusal.MessageIDBeingRespondedTo, refusal.Status = 1, 0xC000
    refusal.ErrorComment = "Größe"
    with pytest.raises(NotWritten):
        command_set(refusal)


@pytest.mark.parametrize("max_pdu", [0, 16, 37, 100, 16382])
def test_fragments_are_pynetdicoms_packed_into_fewer_pdus(max_pdu: int) -> None:
    """The same PDVs as pynetdicom's own fragmenting (command set then data set, each in pieces that fit the
    peer's maximum PDU, the last of each flagged), consecutive ones sharing a PDU while it stays within the
    peer's maximum."""
    answer = dimse_primitives.C_FIND()
    answer.MessageIDBeingRespondedTo, answer.Status, answer.AffectedSOPClassUID = 9, 0xFF00, FIND
    answer.Identifier = BytesIO(bytes(range(256)) * 3)
    message = message_class(answer)()
    message.primitive_to_message(answer)
    expected = [pdv for p in message.encode_msg(1, max_pdu) for pdv in p.presentation_data_value_list]
    pdus = [p.presentation_data_value_list for p in p_data(1, command_set(answer), answer.Identifier.getvalue(),
                                                           max_pdu)]
    assert [pdv for pdvs in pdus for pdv in pdvs] == expected
    for pdvs in pdus:
        assert not max_pdu or sum(5 + len(value) for _, value in pdvs) <= max_pdu
    if max_pdu in (0, 16382):
        assert len(pdus) == 1  # command set and identifier in one PDU


def test_a_short_answer_is_one_pdu() -> None:
    """A C-FIND-RSP without identifier and a C-STORE-RSP: one PDU each."""
    for primitive in (dimse_primitives.C_FIND(), dimse_primitives.C_STORE()):
        primitive.MessageIDBeingRespondedTo, primitive.Status, primitive.AffectedSOPClassUID = 1, 0, FIND
        assert len(list(p_data(1, command_set(primitive), b"", 16382))) == 1


@pytest.mark.parametrize("sop_instance", [ODD_UID, EVEN_UID])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless])
def test_file_header_is_what_pynetdicom_writes_before_a_received_data_set(sop_instance: str, syntax: str) -> None:
    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation: even length
    expected = BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")  # as pynetdicom's DIMSE message decoding writes it
    write_file_meta_info(expected, create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                                                    transfer_syntax=UID(syntax)))
    assert file_header(sop_class, sop_instance, syntax) == expected.getvalue()
    with pytest.raises(NotWritten):
        file_header(sop_class, "1.2.\u00e9", syntax)
    with pytest.raises(NotWritten):  # pydicom would write the values joined by a backslash
        file_header(sop_class, MultiValue(str, ["1.2", "1.3"]), syntax)  # type: ignore[arg-type]
