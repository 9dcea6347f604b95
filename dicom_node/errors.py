"""The one error type of the dicom_node package."""
from __future__ import annotations


class NodeError(ValueError):
    """Input the node cannot accept (a bad UID, a dataset missing what its SOP Class requires, ...)."""
