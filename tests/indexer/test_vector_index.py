"""The HNSW index: ranking, replacement, atomic snapshots, catch-up and rebuild from the catalog."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.catalog import Catalog, InstanceAttrs, SeriesAttrs, StudyAttrs
from indexer.schema import Kind
from indexer.errors import IndexerError
from indexer.vector_index import HnswParams, VectorIndex, _wait_for

PARAMS = HnswParams(dim=8, m=8, ef_construction=50, ef_search=50)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=8).astype(np.float32)
    return v / np.linalg.norm(v)


def test_search_ranks_by_cosine_and_upsert_replaces(tmp_path: Path) -> None:
    index = VectorIndex(PARAMS, tmp_path)
    vectors = np.stack([unit(i) for i in range(50)])
    index.upsert(np.arange(50), vectors * 3)  # scale does not matter in cosine space
    labels, scores = index.search(vectors[7], 5)
    exact = np.argsort(-(vectors @ vectors[7]))[:5]
    assert labels.tolist() == exact.tolist()
    assert abs(scores[0] - 1.0) < 1e-5 and np.all(np.diff(scores) <= 1e-6)
    index.upsert(np.array([7]), -vectors[7][None, :])
    labels, _ = index.search(vectors[7], 1)
    assert labels[0] != 7 and len(index) == 50


def test_search_on_small_or_empty_index(tmp_path: Path) -> None:
    index = VectorIndex(PARAMS, tmp_path)
    assert index.search(unit(0), 10)[0].size == 0
    index.upsert(np.array([1]), unit(1)[None, :])
    assert index.search(unit(0), 10)[0].tolist() == [1]


def test_snapshot_load_and_catch_up(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    pks = []
    for i in range(3):
        catalog.add_instance(StudyAttrs(f"1.{i}"), SeriesAttrs(f"1.{i}.1"),
                             InstanceAttrs(f"1.{i}.1.1", "1.2", "1.2", "p", 1, Kind.IMAGE))
        pks.append(catalog.find_study(f"1.{i}").id)
    seq = catalog.set_study_vectors({pks[0]: (unit(0), np.zeros(14, np.float32)),
                                     pks[1]: (unit(1), np.zeros(14, np.float32))}, "v", pks[:2])
    index = VectorIndex.open(PARAMS, tmp_path / "index", catalog)
    assert len(index) == 2 and index.seq == seq
    index.snapshot()
    catalog.set_study_vectors({pks[2]: (unit(2), np.zeros(14, np.float32))}, "v", pks[2:])
    capfd.readouterr()
    reopened = VectorIndex.open(PARAMS, tmp_path / "index", catalog)
    assert "Warning" not in capfd.readouterr().err  # hnswlib warns on stderr when it loads over an initialised index
    assert len(reopened) == 3
    assert reopened.search(unit(2), 1)[0].tolist() == [pks[2]]
    assert len(list((tmp_path / "index").glob("hnsw-*.bin"))) == 1
    # A corrupt pointer means: rebuild from the catalog, not crash.
    (tmp_path / "index" / "current.json").write_text("{not json")
    rebuilt = VectorIndex.open(PARAMS, tmp_path / "index", catalog)
    assert len(rebuilt) == 3
    catalog.close()


def test_adds_and_searches_do_not_race(tmp_path: Path) -> None:
    index = VectorIndex(PARAMS, tmp_path, capacity=16)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for start in range(0, 2000, 50):
                index.upsert(np.arange(start, start + 50), np.random.default_rng(start).normal(size=(50, 8)))
        except BaseException as error:
            errors.append(error)

    def reader() -> None:
        try:
            for i in range(400):
                index.search(unit(i), 10)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(index) == 2000


def test_failed_snapshot_keeps_the_previous_one(tmp_path: Path) -> None:
    index = VectorIndex(PARAMS, tmp_path)
    vectors = np.stack([unit(i) for i in range(20)])
    index.upsert(np.arange(20), vectors, seq=1)
    first = index.snapshot()
    index.upsert(np.arange(20, 40), -vectors, seq=2)
    # The writer (a forked child) cannot create its file: its name leads into a folder that does not exist.
    blocked = tmp_path / ".hnsw-000000000002-40.bin.tmp"
    blocked.symlink_to(tmp_path / "missing" / "file")
    with pytest.raises(IndexerError, match="snapshot writer failed"):
        index.snapshot()
    loaded = VectorIndex.load_snapshot(PARAMS, tmp_path)
    assert loaded is not None and len(loaded) == 20 and loaded.seq == 1
    assert loaded.search(vectors[3], 1)[0].tolist() == [3] and first.exists()
    assert not blocked.is_symlink()  # the failed attempt's file is gone
    index.snapshot()
    assert len(VectorIndex.load_snapshot(PARAMS, tmp_path) or []) == 40


def test_a_hung_snapshot_writer_is_killed() -> None:
    pid = os.fork()
    if pid == 0:  # stands for a writer that never finishes
        time.sleep(60)
        os._exit(0)
    started = time.monotonic()
    assert _wait_for(pid, 0.3) == -signal.SIGKILL
    assert time.monotonic() - started < 30


def test_background_load_refuses_until_ready_and_a_failed_load_says_so(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    saved = VectorIndex(PARAMS, tmp_path / "index")
    saved.upsert(np.arange(3), np.stack([unit(i) for i in range(3)]), seq=1)
    written = saved.snapshot()
    content = written.read_bytes()
    gate = threading.Event()
    load_snapshot = VectorIndex.load_snapshot

    def held(cls: type[VectorIndex], params: HnswParams, directory: Path) -> VectorIndex | None:
        assert gate.wait(60), "the test never opened the gate"
        return load_snapshot(params, directory)

    monkeypatch.setattr(VectorIndex, "load_snapshot", classmethod(held))
    index = VectorIndex.open_in_background(PARAMS, tmp_path / "index", catalog)
    assert index.state == "loading" and not index.ready
    for touch in (lambda: index.search(unit(0), 1), lambda: index.snapshot(),
                  lambda: index.upsert(np.array([9]), unit(9)[None, :])):
        with pytest.raises(IndexerError, match="not ready"):
            touch()
    assert written.read_bytes() == content and sorted(p.name for p in written.parent.iterdir()) == \
        ["current.json", written.name]  # nothing written over the snapshot being loaded
    gate.set()
    deadline = time.monotonic() + 30
    while not index.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert index.state == "ready" and len(index) == 3 and index.seq == index.saved_seq == 1
    assert index.search(unit(2), 1)[0].tolist() == [2]

    def broken(cls: type[VectorIndex], params: HnswParams, directory: Path) -> VectorIndex | None:
        raise MemoryError("no room for the graph")

    monkeypatch.setattr(VectorIndex, "load_snapshot", classmethod(broken))
    failed = VectorIndex.open_in_background(PARAMS, tmp_path / "index", catalog)
    deadline = time.monotonic() + 30
    while failed.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failed.state == "failed" and not failed.ready
    catalog.close()
