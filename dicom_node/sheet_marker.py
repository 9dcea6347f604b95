"""How the node recognises its own reference sheets: a private block that only it writes.

Kept apart from ``reference_sheet`` (which renders with highdicom and the image decoder) so that the
receive path can check a dataset without importing either.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

SHEET_GROUP = 0x0099
SHEET_CREATOR = "MMDL REFERENCE SHEET 1.0"
# Element offsets inside the block: what the object is, the model that ranked the cases, how many cases.
SHEET_TYPE, SHEET_MODEL_VERSION, SHEET_CASES = 0x01, 0x02, 0x03
SHEET_TYPE_VALUE = "REFERENCE CASES"


def is_reference_sheet(ds: Dataset) -> bool:
    """Whether ``ds`` is a reference sheet made by an MMDL node (its private block names it so)."""
    try:
        block = ds.private_block(SHEET_GROUP, SHEET_CREATOR)
        value = block[SHEET_TYPE].value
    except KeyError:
        return False
    if isinstance(value, bytes):  # implicit VR: private elements arrive as UN
        value = value.decode("ascii", errors="replace")
    return str(value).strip(" \x00") == SHEET_TYPE_VALUE
