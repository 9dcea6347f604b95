"""The file store never builds a path from an unchecked UID and never leaves partial files."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dicom_node import storage
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


def test_keep_renames_the_received_file_into_place(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    received = store.incoming / "tmp123.dcm"
    received.write_bytes(b"DICM-bytes")
    relative = store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    store.keep(relative, received)
    assert (tmp_path / "storage" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm").read_bytes() == b"DICM-bytes"
    assert not received.exists()
    assert store.absolute(relative) == (tmp_path / "storage").resolve() / relative
    for outside in ("../outside.dcm", "1.2/../../outside.dcm", "/etc/passwd", "1.2/3/../../../x.dcm"):
        with pytest.raises(NodeError):
            store.absolute(outside)


def test_leftovers_in_incoming_are_removed_once_old_enough(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    old, fresh = store.incoming / "tmpold.dcm", store.incoming / "tmpnew.dcm"
    old.write_bytes(b"half")
    fresh.write_bytes(b"arriving")
    os.utime(old, (time.time() - 600, time.time() - 600))
    assert store.remove_temporaries(older_than_s=300) == 1
    assert not old.exists() and fresh.exists()
    (store.incoming / "tmpdir-of-a-library").mkdir()
    assert store.remove_temporaries() == 1
    assert [p.name for p in store.incoming.iterdir()] == ["tmpdir-of-a-library"]


def test_a_folder_created_by_another_store_is_made_durable_before_returning(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two instances of one new study at once: the second must not return (answer success) while the study
    folder's entry in the storage root is not yet fsynced by the first; it fsyncs the root itself."""
    store = FileStore(tmp_path / "storage")
    synced: list[tuple[str, Path]] = []
    first_at_root, release = threading.Event(), threading.Event()

    def fsync_directory(folder: Path) -> None:
        synced.append((threading.current_thread().name, folder))
        if folder == store.root and threading.current_thread().name == "first":
            first_at_root.set()
            release.wait(30)

    monkeypatch.setattr(storage, "fsync_directory", fsync_directory)
    received = []
    for name in ("a", "b"):
        received.append(store.incoming / f"{name}.dcm")
        received[-1].write_bytes(name.encode())
    first = threading.Thread(target=store.keep, args=(store.relative_path("1.2", "1.2.3", "1.2.3.1"), received[0]),
                             name="first")
    first.start()
    assert first_at_root.wait(30)
    store.keep(store.relative_path("1.2", "1.2.3", "1.2.3.2"), received[1])
    release.set()
    first.join(30)
    series = store.root / "1.2" / "1.2.3"
    assert [folder for name, folder in synced if name == "first"] == [series, series.parent, store.root]
    assert [folder for name, folder in synced if name != "first"] == [series, store.root]
    assert (series / "1.2.3.2.dcm").read_bytes() == b"b"


def test_a_folder_found_is_made_durable_once_by_each_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver process (or the node after a restart) storing into a series folder another process created must
    not answer success before that folder's entries are durable: the first time it stores there it fsyncs the
    study folder and the storage root too; after that, the series folder only."""
    synced: list[Path] = []
    monkeypatch.setattr(storage, "fsync_directory", synced.append)
    creator, other = FileStore(tmp_path / "storage"), FileStore(tmp_path / "storage")
    series = creator.root / "1.2" / "1.2.3"
    for store, sop_uid in ((creator, "1.2.3.1"), (other, "1.2.3.2"), (other, "1.2.3.3"), (creator, "1.2.3.4")):
        received = store.incoming / f"{sop_uid}.dcm"
        received.write_bytes(sop_uid.encode())
        synced.clear()
        store.keep(store.relative_path("1.2", "1.2.3", sop_uid), received)
        expected = [series, series.parent, store.root] if sop_uid in ("1.2.3.1", "1.2.3.2") else [series]
        assert synced == expected, sop_uid
        assert (series / f"{sop_uid}.dcm").read_bytes() == sop_uid.encode()
