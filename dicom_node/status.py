"""DICOM status codes the node answers with, named (PS3.4 Annex B, C and GG; PS3.7 Annex C)."""
from __future__ import annotations

import enum


class Status(enum.IntEnum):
    SUCCESS = 0x0000
    PENDING = 0xFF00
    CANCEL = 0xFE00
    # C-STORE
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    # A different object was already stored under this SOP Instance UID (another study): refused.
    DUPLICATE_CONFLICT = 0xC001
    # C-FIND / C-MOVE / C-GET
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    UNABLE_TO_PROCESS = 0xC000
    UNKNOWN_STUDY = 0xC101  # similar-case query names a study this node does not hold
    STUDY_NOT_INDEXED = 0xC102  # the study is held but has no vector yet
    MOVE_DESTINATION_UNKNOWN = 0xA801
    UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702  # no sub-operation succeeded
    SUB_OPERATIONS_WITH_FAILURES = 0xB000  # warning: some sub-operations failed


# Association rejection (PS3.8 9.3.4): (result, source, diagnostic)
REJECT_CALLED_AET = (0x01, 0x01, 0x07)
REJECT_CALLING_AET = (0x01, 0x01, 0x03)
REJECT_NO_RESOURCES = (0x02, 0x03, 0x02)  # transient, local limit exceeded: try again later
