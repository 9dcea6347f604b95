"""The C-STORE statuses and the durability the README promises, each made to happen over a real association:
0xA700 when the write or the catalog commit fails (nothing kept), 0xC102 for a held but unindexed study, and
the order of fsyncs and renames that makes a success survive a crash."""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import text

from dicom_node.server import Node
from dicom_node.status import Status
from dicom_node.storage import INCOMING
from indexer.schema import Instance
from tests.dicom_node.builders import dx_synthetic
from tests.helpers import wait_until

DX = DigitalXRayImageStorageForPresentation
FIND = StudyRootQueryRetrieveInformationModelFind


def send(node: Node, *datasets: Dataset, called: str = "MMDL_NODE") -> list[int]:
    ae = AE("PACS")
    ae.add_requested_context(DX)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def stored_files(node: Node) -> list[Path]:
    """Every file under the storage folder, the incoming folder included."""
    return [p for p in node.store.root.rglob("*") if p.is_file()]


def instance_count(node: Node) -> int:
    with node.catalog.session() as session:
        return session.query(Instance).count()


class Recorder:
    """Records os.fsync, os.replace and os.unlink calls on the storage folder, in the order they happen, as
    (operation, what): 'received' (the file in the incoming folder), 'stored' (the file in its series folder),
    'series', 'study', 'root'. pynetdicom's own clean-up of the received file's name is left out."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.calls: list[tuple[str, str]] = []
        fsync, replace, unlink = os.fsync, os.replace, os.unlink

        def recording_fsync(fd: int) -> None:
            self._record("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")))
            fsync(fd)

        def recording_replace(source: str | os.PathLike[str], target: str | os.PathLike[str], **kwargs: object) -> None:
            self._record("replace", Path(target))
            replace(source, target, **kwargs)

        def recording_unlink(path: str | os.PathLike[str], **kwargs: object) -> None:
            if INCOMING not in Path(path).parts:
                self._record("unlink", Path(path))
            unlink(path, **kwargs)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        monkeypatch.setattr(os, "replace", recording_replace)
        monkeypatch.setattr(os, "unlink", recording_unlink)

    def _record(self, operation: str, path: Path) -> None:
        if path == self.root:
            self.calls.append((operation, "root"))
        elif path.is_relative_to(self.root):
            parts = path.relative_to(self.root).parts
            what = "received" if parts[0] == INCOMING else "stored" if path.suffix == ".dcm" else \
                {1: "study", 2: "series"}[len(parts)]
            self.calls.append((operation, what))

    def mark(self, what: str) -> None:
        self.calls.append((what, ""))

    def take(self) -> list[tuple[str, str]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture()
def node(start_node: Callable[..., Node]) -> Node:
    return start_node()


@pytest.fixture()
def recorder(node: Node, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder(node.store.root, monkeypatch)
    add_instance = node.catalog.add_instance

    def recording_add_instance(*args: object, **kwargs: object) -> object:
        outcome = add_instance(*args, **kwargs)
        recorder.mark("commit")
        return outcome

    monkeypatch.setattr(node.catalog, "add_instance", recording_add_instance)
    yield recorder


def test_fsync_and_rename_order(node: Node, recorder: Recorder) -> None:
    study_uid = generate_uid()
    first = dx_synthetic(study_uid, "P1", "A1", seed=1)
    same_series = dx_synthetic(study_uid, "P1", "A1", seed=2)
    same_series.SeriesInstanceUID = first.SeriesInstanceUID
    new_series = dx_synthetic(study_uid, "P1", "A1", seed=3)
    expected_head = [("fsync", "received"), ("replace", "stored"), ("fsync", "series")]
    for ds, parents in ((first, [("fsync", "study"), ("fsync", "root")]),  # new study and series folders
                        (same_series, []),
                        (new_series, [("fsync", "study")])):  # a new series folder in a known study
        recorder.take()
        assert send(node, ds) == [Status.SUCCESS]
        recorder.mark("success")
        assert recorder.take() == [*expected_head, *parents, ("commit", ""), ("success", "")]
    assert instance_count(node) == 3


def test_failed_write_is_out_of_resources_and_keeps_nothing(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    replace = os.replace

    def disk_full(source: str | os.PathLike[str], target: str | os.PathLike[str], **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(os, "replace", disk_full)
    ds = dx_synthetic(generate_uid(), "P2", "A2")
    ae = AE("PACS")
    ae.add_requested_context(DX)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    answer = assoc.send_c_store(ds)
    assoc.release()
    assert answer.Status == Status.OUT_OF_RESOURCES and "No space left" in answer.ErrorComment
    assert stored_files(node) == [] and instance_count(node) == 0
    monkeypatch.setattr(os, "replace", replace)
    assert send(node, ds) == [Status.SUCCESS]  # the same instance, once the disk has room again


def test_failed_commit_is_out_of_resources_and_removes_the_file(node: Node, recorder: Recorder) -> None:
    # A real failing commit: the catalog's database refuses every new instance row.
    with node.catalog.engine.begin() as connection:
        connection.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON instances "
                                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
    ds = dx_synthetic(generate_uid(), "P3", "A3")
    recorder.take()
    assert send(node, ds) == [Status.OUT_OF_RESOURCES]
    calls = recorder.take()
    # The file was renamed into place, the commit failed, the file was deleted and its folder fsynced.
    assert calls[:3] == [("fsync", "received"), ("replace", "stored"), ("fsync", "series")]
    assert calls[-2:] == [("unlink", "stored"), ("fsync", "series")] and ("commit", "") not in calls
    assert stored_files(node) == [] and instance_count(node) == 0
    with node.catalog.engine.begin() as connection:
        connection.execute(text("DROP TRIGGER refuse"))
    assert send(node, ds) == [Status.SUCCESS]


def test_held_but_not_indexed_study_is_c102(start_node: Callable[..., Node]) -> None:
    node = start_node(scheduler={"interval_s": 3600})
    wait_until(lambda: node.scheduler.runs.get("embed", 0) >= 1, 30, "the embedding job's first (empty) run")
    ds = dx_synthetic(generate_uid(), "P4", "A4")
    assert send(node, ds) == [Status.SUCCESS]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ds.StudyInstanceUID
    ae = AE("VIEWER")
    ae.add_requested_context(FIND)

    def similar() -> list[int]:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_SIMILAR")
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, FIND)]
        assoc.release()
        return statuses

    assert similar() == [Status.STUDY_NOT_INDEXED]
    node.embed()  # the job's next run, now
    assert similar() == [Status.SUCCESS]  # indexed; no other study to answer with
