"""The HNSW index of study vectors (hnswlib, cosine), snapshotted atomically and rebuilt from the catalog.

hnswlib's ``add_items`` and ``knn_query`` must not run at the same time, so every access holds one lock.
A snapshot is a file named after the catalog sequence number it contains plus a small pointer file
(``current.json``) that is replaced atomically; at start the newest snapshot is loaded and caught up with
the catalog rows that changed after it, or the index is rebuilt from the catalog when there is none.
The node does that in a background thread (``open_in_background``), so that its ports open first.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import hnswlib
import numpy as np

from indexer.catalog import Catalog
from indexer.children import die_with
from indexer.durable import fsync_directory
from indexer.errors import IndexerError

if TYPE_CHECKING:
    from config.settings import IndexSettings

LOG = logging.getLogger(__name__)
POINTER = "current.json"
WRITER_TIMEOUT_S = 900.0  # a snapshot writer still running after this is killed (and the snapshot retried)
READ_AHEAD_CHUNK = 16 * 2**20
IndexState = Literal["loading", "ready", "failed"]


def _detach_from(parent: int) -> None:
    """In a forked child: drop the parent's descriptors (its DICOM sockets, listening one included, must
    close when the parent closes them), and be killed when ``parent`` dies (Linux), so that no writer
    outlives a killed node and leaves a file behind after the next start cleaned up."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    die_with(parent)


def _read_ahead(path: Path) -> None:
    """Read ``path`` once, so that it is in the page cache. hnswlib's ``load_index`` holds the GIL for the
    whole load, which would freeze every thread of the node while a cold disk turns (~250 MB/s); these
    reads release it, and the load that follows copies from memory (~1 GB/s)."""
    buffer = bytearray(READ_AHEAD_CHUNK)
    with path.open("rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def _wait_for(pid: int, timeout_s: float) -> int:
    """The exit code of child ``pid``; killed (-9) when it runs longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.05)


@dataclass(frozen=True)
class HnswParams:
    dim: int
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    @classmethod
    def from_settings(cls, dim: int, settings: IndexSettings) -> HnswParams:
        """The parameters the ``[index]`` settings name, for vectors of ``dim`` dimensions."""
        return cls(dim, settings.m, settings.ef_construction, settings.ef_search)


class VectorIndex:
    """Study vectors keyed by the catalog's study primary key; scores are cosine similarities.

    An index from ``open_in_background`` is ``loading`` until its load finishes, then ``ready`` (or ``failed``,
    logged); until it is ready ``search``, ``upsert`` and ``snapshot`` raise IndexerError, so check ``ready``.
    """

    def __init__(self, params: HnswParams, directory: Path, capacity: int = 1024) -> None:
        self.params = params
        self.directory = directory
        self.seq = 0  # the catalog sequence number this index contains everything up to
        self.saved_seq = 0  # the seq of the snapshot written last (when loaded: of the catalog caught up with)
        self.state: IndexState = "ready"
        self._lock = threading.Lock()
        self._index = self._new_index(capacity)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def _require_ready(self) -> None:
        if not self.ready:
            raise IndexerError(f"the vector index is not ready ({self.state})")

    def _new_index(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="cosine", dim=self.params.dim)
        index.init_index(max_elements=capacity, M=self.params.m, ef_construction=self.params.ef_construction)
        index.set_ef(self.params.ef_search)
        return index

    def __len__(self) -> int:
        return self._index.get_current_count()

    def upsert(self, labels: np.ndarray, vectors: np.ndarray, seq: int | None = None) -> None:
        """Add or replace vectors; ``seq`` records the catalog sequence they come from."""
        self._require_ready()
        if len(labels) == 0:
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[1] != self.params.dim:
            raise IndexerError(f"vector dimension {vectors.shape[1]} does not match the index ({self.params.dim})")
        with self._lock:
            needed = self._index.get_current_count() + len(labels)
            if needed > self._index.get_max_elements():
                self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
            self._index.add_items(vectors, np.asarray(labels, dtype=np.int64))
            if seq is not None:
                self.seq = max(self.seq, seq)

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest labels and their cosine similarities, best first."""
        self._require_ready()
        with self._lock:
            k = min(k, self._index.get_current_count())
            if k == 0:
                return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
            self._index.set_ef(max(self.params.ef_search, k))
            labels, distances = self._index.knn_query(np.asarray(vector, dtype=np.float32)[None, :], k=k)
        return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)

    # -- persistence ---------------------------------------------------------------------------
    def snapshot(self) -> Path:
        """Write the index to a new file, fsync it, then switch the pointer to it atomically.

        hnswlib's save holds the GIL for the whole write (1.3 s for 100k studies, ~10x that at 1M), which
        would freeze every association of the node. So a forked child writes the copy-on-write image of
        the index as it was at the fork, while this process goes on serving (as Redis' BGSAVE does)."""
        self._require_ready()  # a loading index is empty: never written over the snapshot it is loaded from
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:  # the fork sees no half-done upsert
            seq = self.seq
            name = f"hnsw-{seq:012d}-{len(self)}.bin"
            tmp = self.directory / f".{name}.tmp"
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:  # the child: write, fsync, leave without running any of the parent's cleanup
                code = 1
                try:
                    _detach_from(parent)
                    self._index.save_index(str(tmp))
                    with tmp.open("rb") as handle:
                        os.fsync(handle.fileno())
                    code = 0
                finally:
                    os._exit(code)
        code = _wait_for(pid, WRITER_TIMEOUT_S)
        if code != 0:
            tmp.unlink(missing_ok=True)
            raise IndexerError(f"the snapshot writer failed (exit code {code}); the previous snapshot stays current")
        final = self.directory / name
        os.replace(tmp, final)
        pointer = {"file": name, "seq": seq, "dim": self.params.dim, "m": self.params.m,
                   "ef_construction": self.params.ef_construction}
        tmp_pointer = self.directory / f".{POINTER}.tmp"
        with tmp_pointer.open("w") as handle:
            json.dump(pointer, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_pointer, self.directory / POINTER)
        fsync_directory(self.directory)
        for old in self.directory.glob("hnsw-*.bin"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.saved_seq = seq
        return final

    @classmethod
    def load_snapshot(cls, params: HnswParams, directory: Path) -> VectorIndex | None:
        """The snapshot the pointer names, or None when there is none or it does not fit ``params``."""
        try:
            pointer = json.loads((directory / POINTER).read_text())
            path = directory / pointer["file"]
            if (pointer["dim"], pointer["m"]) != (params.dim, params.m) or not path.is_file():
                LOG.warning("index snapshot %s does not match the configuration; rebuilding", path)
                return None
            index = cls(params, directory, capacity=1)
            _read_ahead(path)
            # Into an index not initialised: hnswlib warns on stderr, at every start, when it replaces one.
            index._index = hnswlib.Index(space="cosine", dim=params.dim)
            index._index.load_index(str(path), max_elements=0)
            index._index.set_ef(params.ef_search)
            index.seq = int(pointer["seq"])
            return index
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            LOG.warning("index snapshot in %s unreadable (%s); rebuilding", directory, error)
            return None

    @classmethod
    def open(cls, params: HnswParams, directory: Path, catalog: Catalog) -> VectorIndex:
        """Load the newest snapshot and catch it up with the catalog, or rebuild from the catalog."""
        start = time.monotonic()
        LOG.info("loading the vector index from %s", directory)
        for partial in directory.glob(".*.tmp"):  # a snapshot interrupted by a crash
            partial.unlink()
        index = cls.load_snapshot(params, directory) or cls(params, directory)
        start_seq = index.seq
        added = 0
        for labels, vectors in catalog.study_vectors(after_seq=start_seq):
            index.upsert(labels, vectors)
            added += len(labels)
        index.seq = index.saved_seq = max(start_seq, catalog.max_index_seq())
        LOG.info("vector index ready: %d studies (%d caught up from the catalog after seq %d) in %.2f s",
                 len(index), added, start_seq, time.monotonic() - start)
        return index

    @classmethod
    def open_in_background(cls, params: HnswParams, directory: Path, catalog: Catalog) -> VectorIndex:
        """An empty index in state ``loading`` that ``open`` fills in a daemon thread, then ``ready``.

        Nothing is written meanwhile (the snapshot it loads stays as it is); a node stopped during the load
        leaves the thread to finish or die with the process (hnswlib's load cannot be interrupted). A load
        that raises leaves the index ``failed``, logged."""
        index = cls(params, directory, capacity=1)
        index.state = "loading"
        threading.Thread(target=index._load, args=(catalog,), name="index-load", daemon=True).start()
        return index

    def _load(self, catalog: Catalog) -> None:
        try:
            loaded = self.open(self.params, self.directory, catalog)
        except Exception:  # on this thread nobody else would see it
            LOG.exception("vector index load failed: similar-case queries are refused until a restart")
            self.state = "failed"
            return
        with self._lock:
            self._index, self.seq, self.saved_seq = loaded._index, loaded.seq, loaded.saved_seq
            self.state = "ready"
