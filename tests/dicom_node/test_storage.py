"""The file store never builds a path from an unchecked UID and never leaves partial files."""
from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.errors import NodeError
from dicom_node.storage import FileStore, check_uid


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2/3", "1..2", ".1.2", "1.2.", "1.2.a", "1" * 65, "",
                                 "1.2\x00/x", "..", "1.2.3 4"])
def test_bad_uids_are_refused(bad: str) -> None:
    with pytest.raises(NodeError):
        check_uid(bad, "SOPInstanceUID")


def test_good_uid_passes_and_trailing_padding_is_removed() -> None:
    assert check_uid("1.2.840.10008.5.1.4.1.1.1\x00", "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.1"
    assert check_uid("1." + "2" * 62, "x") == "1." + "2" * 62


def test_write_is_atomic_and_inside_the_root(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    relative = store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    store.write(relative, b"DICM-bytes")
    assert (tmp_path / "storage" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm").read_bytes() == b"DICM-bytes"
    assert not list((tmp_path / "storage").rglob("*.tmp"))
    with pytest.raises(NodeError):
        store.absolute("../outside.dcm")


def test_leftover_temporaries_are_removed(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    (tmp_path / "storage" / "1.2").mkdir()
    (tmp_path / "storage" / "1.2" / ".1.2.3.dcm.abcd.tmp").write_bytes(b"half")
    assert store.remove_temporaries() == 1
    assert not list((tmp_path / "storage").rglob("*.tmp"))
