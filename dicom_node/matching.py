"""What a C-FIND, C-MOVE, C-GET or QIDO request asks the catalog to match: its level and its keys.

The matching itself is the catalog's (``indexer.matching``).
"""
from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.errors import NodeError
from indexer.schema import LEVELS, QUERY_KEYS

MATCHED = (*QUERY_KEYS, "ModalitiesInStudy")


def query_level(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise NodeError(f"QueryRetrieveLevel must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


def _value(identifier: Dataset, keyword: str) -> str:
    value = identifier.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def matching_keys(identifier: Dataset) -> dict[str, str]:
    """The values of the keys the catalog matches on that ``identifier`` gives, several joined by backslashes."""
    return {keyword: value for keyword in MATCHED if keyword in identifier and (value := _value(identifier, keyword))}
