"""DICOM status codes the node answers with, named (PS3.4 Annex B, C and GG; PS3.7 Annex C)."""
from __future__ import annotations

import enum

ANY = "any service"
STORE = "C-STORE"
QUERY_RETRIEVE = "C-FIND, C-MOVE, C-GET"


@enum.unique
class Status(enum.IntEnum):
    """A status and the service it belongs to. It is its code wherever an int is used (pynetdicom, ``%X``),
    but two services' statuses that share a code stay two members, each with its own name (for logs and
    metric labels); ``enum.unique`` keeps it so."""

    def __new__(cls, code: int, service: str) -> Status:
        member = int.__new__(cls, code)
        member._value_ = (code, service)
        return member

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: 0x{self:04X}>"

    SUCCESS = 0x0000, ANY
    PENDING = 0xFF00, ANY
    CANCEL = 0xFE00, ANY
    OUT_OF_RESOURCES = 0xA700, STORE
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900, STORE
    CANNOT_UNDERSTAND = 0xC000, STORE
    # A different object was already stored under this SOP Instance UID (another study): refused.
    DUPLICATE_CONFLICT = 0xC001, STORE
    # PS3.4 C.4.1.1.4 "Refused: Out of Resources": the similarity index is not loaded yet after a start, a
    # temporary condition the client may retry (0xC102 below is about one study, and lasts until it is embedded).
    INDEX_NOT_READY = 0xA700, QUERY_RETRIEVE
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900, QUERY_RETRIEVE
    UNABLE_TO_PROCESS = 0xC000, QUERY_RETRIEVE
    IDENTIFIER_NOT_ENCODED = 0xC312, QUERY_RETRIEVE  # an answer could not be encoded (pynetdicom's code for it)
    UNKNOWN_STUDY = 0xC101, QUERY_RETRIEVE  # similar-case query names a study this node does not hold
    STUDY_NOT_INDEXED = 0xC102, QUERY_RETRIEVE  # the study is held but has no vector yet
    MOVE_DESTINATION_UNKNOWN = 0xA801, QUERY_RETRIEVE
    UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702, QUERY_RETRIEVE  # no sub-operation succeeded
    SUB_OPERATIONS_WITH_FAILURES = 0xB000, QUERY_RETRIEVE  # warning: some sub-operations failed


# Association rejection (PS3.8 9.3.4): (result, source, diagnostic)
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
REJECT_NO_RESOURCES = (0x02, 0x03, 0x02)  # transient, local limit exceeded: try again later
