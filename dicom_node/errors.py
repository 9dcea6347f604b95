"""The one error type of the dicom_node package."""
from __future__ import annotations

from dicom_node.status import Status


class NodeError(ValueError):
    """Input the node cannot accept (a bad UID, a dataset missing what its SOP Class requires, ...).

    ``status`` is the answer to a C-FIND, C-MOVE or C-GET it refuses; subclasses set their own.
    """

    status = Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
