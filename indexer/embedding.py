"""The embedding job: pending images and reports -> vectors in the catalog -> study vectors in the index.

A pure function of catalog rows and the model, so an archive backfill could run it elsewhere (a GPU
batch job) and write into the same catalog. Decoding and preprocessing run in a thread pool one batch
ahead of the model, and saving runs one batch behind it on a writer thread: while the backbone embeds
batch n, the pool reads and prepares batch n+1 and the writer stores batch n-1 and refreshes its
studies. An item that cannot be decoded or embedded is marked failed with its reason and never blocks
the others.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from indexer.catalog import Catalog, PendingItem
from indexer.schema import Instance, Report
from indexer.vector_index import VectorIndex
from models.study import study_vector

LOG = logging.getLogger(__name__)
# An image in the decode pool: its catalog row and the future of its prepared model input.
Slot = tuple[PendingItem, "Future[Any]"]
# Rows embedded whose results are still being written, by table.
Unsaved = dict[type, set[int]]


class Encoder(Protocol):
    """What the job needs of an MMDL model (models.bundle.MMDLModel provides it).

    ``prepare_image`` runs in the decode pool, beside ``embed_prepared`` on the job's thread.
    """

    version: str

    def prepare_image(self, image: np.ndarray) -> Any: ...
    def embed_prepared(self, prepared: Sequence[Any]) -> np.ndarray: ...
    def embed_reports(self, texts: Sequence[str]) -> np.ndarray: ...
    def predict_labels(self, embeddings: np.ndarray) -> np.ndarray: ...


@dataclass
class RoundStats:
    images: int = 0
    reports: int = 0
    failed: int = 0
    studies: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class Results:
    """One batch's outcome, to be saved: vectors and failure reasons by row id, and the studies they touch."""

    table: type[Instance] | type[Report]
    vectors: dict[int, np.ndarray]
    failures: dict[int, str]
    study_pks: set[int]


class EmbeddingJob:
    """One run embeds everything pending, batch by batch, up to ``max_seconds``.

    Three things overlap: up to two batches of images are in the decode pool (the one the model takes
    next and the one after it), the model embeds one batch on the job's thread, and one writer thread
    saves the previous batch's results and refreshes its studies in the catalog and the index.
    """

    def __init__(
        self,
        catalog: Catalog,
        index: VectorIndex,
        storage_root: Path,
        load_model: Callable[[], Encoder],
        decode: Callable[[Path], np.ndarray],
        batch_size: int = 16,
        decode_workers: int = 2,
        max_seconds: float = 30.0,
    ) -> None:
        self.catalog = catalog
        self.index = index
        self.storage_root = storage_root
        self._load_model = load_model
        self._model: Encoder | None = None
        self._decode = decode
        self.batch_size = batch_size
        self.max_seconds = max_seconds
        self._pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="decode")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catalog")

    @property
    def model(self) -> Encoder:
        """The encoder, loaded on first use (in the calling thread, never in the decode pool)."""
        if self._model is None:
            self._model = self._load_model()
            LOG.info("embedding model %s loaded", self._model.version)
        return self._model

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)

    def run(self) -> RoundStats:
        """Embed pending images and reports and refresh their studies until none is left or time is up.

        A batch started before ``max_seconds`` is finished and saved; images still in the decode pool
        then stay pending for the next run (decoding has no side effect). Results are saved in batch
        order, one write at a time; a failed write ends the run with its error, its rows still pending.
        Nothing is done while the index loads: what is pending stays so in the catalog until a later run.
        """
        stats = RoundStats()
        if not self.index.ready:
            return stats
        start = time.monotonic()
        in_flight: dict[int, Slot] = {}
        unsaved: Unsaved = {Instance: set(), Report: set()}  # row ids embedded, not yet saved
        writing: Future[int] | None = None
        try:
            while time.monotonic() - start < self.max_seconds:
                images = self._next_images(in_flight, unsaved[Instance])
                reports = self._next_reports(unsaved[Report])
                if not images and not reports:
                    stats.studies += self._finish(writing, unsaved)
                    writing = None
                    looked_at, updated = self._refresh_studies()  # also studies made dirty elsewhere
                    stats.studies += updated
                    if not looked_at:
                        break
                    continue
                results = [self._embed_images(images, stats), self._embed_reports(reports, stats)]
                stats.studies += self._finish(writing, unsaved)
                for r in results:
                    unsaved[r.table].update((*r.vectors, *r.failures))
                writing = self._writer.submit(self._save, results)
            stats.studies += self._finish(writing, unsaved)
            writing = None
        finally:
            if writing is not None:  # the run is failing already: let the write end, its outcome is secondary
                wait([writing])
            for _, future in in_flight.values():
                future.cancel()
        stats.seconds = time.monotonic() - start
        if stats.images or stats.reports or stats.failed:
            LOG.info("embedded %d images, %d reports (%d failed), %d studies updated in %.2f s",
                     stats.images, stats.reports, stats.failed, stats.studies, stats.seconds)
        return stats

    def _next_images(self, in_flight: dict[int, Slot], unsaved: set[int]) -> list[Slot]:
        """The next batch (oldest first), after topping the pool up to this batch and the one after it.

        One catalog query per batch: the pending images neither in the pool nor waiting to be saved.
        """
        room = 2 * self.batch_size - len(in_flight)
        if room > 0:
            busy = in_flight.keys() | unsaved
            fresh = [i for i in self.catalog.pending_images(len(busy) + room) if i.id not in busy]
            if fresh:
                model = self.model  # loaded here, before any worker needs it
                for item in fresh[:room]:
                    in_flight[item.id] = (item, self._pool.submit(self._prepare_one, model, item))
        return [in_flight.pop(key) for key in list(in_flight)[: self.batch_size]]

    def _next_reports(self, unsaved: set[int]) -> list[PendingItem]:
        """The next batch of pending reports, leaving out those waiting to be saved."""
        pending = self.catalog.pending_reports(self.batch_size + len(unsaved))
        return [r for r in pending if r.id not in unsaved][: self.batch_size]

    def _prepare_one(self, model: Encoder, item: PendingItem) -> Any:
        """Read, decode and preprocess one image (runs in the pool); an exception fails this item alone."""
        return model.prepare_image(self._decode(self.storage_root / item.payload))

    def _embed_images(self, batch: list[Slot], stats: RoundStats) -> Results:
        failures: dict[int, str] = {}
        ready: list[tuple[PendingItem, Any]] = []
        for item, future in batch:
            try:
                ready.append((item, future.result()))
            except Exception as error:  # any decoder or preprocessing failure marks this one item failed
                failures[item.id] = _reason(error)
        vectors = self._embed(ready, self.model.embed_prepared, failures) if ready else {}
        self._count(stats, failures)
        stats.images += len(vectors)
        return Results(Instance, vectors, failures, {item.study_pk for item, _ in batch if item.id in vectors})

    def _embed_reports(self, items: list[PendingItem], stats: RoundStats) -> Results:
        failures: dict[int, str] = {}
        ready = [(item, item.payload) for item in items]
        vectors = self._embed(ready, self.model.embed_reports, failures) if ready else {}
        self._count(stats, failures)
        stats.reports += len(vectors)
        return Results(Report, vectors, failures, {i.study_pk for i in items if i.id in vectors})

    def _save(self, results: list[Results]) -> int:
        """Save a batch's results, then refresh the studies they made dirty (runs on the writer thread)."""
        for r in results:
            if r.vectors or r.failures:
                self.catalog.save_results(r.table, r.vectors, r.failures, r.study_pks)
        return self._refresh_studies()[1]

    @staticmethod
    def _finish(writing: Future[int] | None, unsaved: Unsaved) -> int:
        """Wait for the write under way; its error if it failed, else how many studies it refreshed."""
        if writing is None:
            return 0
        refreshed = writing.result()
        for ids in unsaved.values():
            ids.clear()
        return refreshed

    @staticmethod
    def _embed(ready: list[tuple[PendingItem, Any]], embed: Callable[[list[Any]], np.ndarray],
               failures: dict[int, str]) -> dict[int, np.ndarray]:
        """Embed as one batch; if the batch fails, item by item so one bad input fails alone."""
        try:
            out = embed([x for _, x in ready])
            return {item.id: out[i] for i, (item, _) in enumerate(ready)}
        except Exception:  # isolate the culprit below
            vectors = {}
            for item, x in ready:
                try:
                    vectors[item.id] = embed([x])[0]
                except Exception as error:
                    failures[item.id] = _reason(error)
            return vectors

    @staticmethod
    def _count(stats: RoundStats, failures: dict[int, str]) -> None:
        stats.failed += len(failures)
        for reason in failures.values():
            key = reason.split(":", 1)[0]
            stats.failures[key] = stats.failures.get(key, 0) + 1

    def _refresh_studies(self) -> tuple[int, int]:
        """Recompute the dirty studies' vectors and scores, store them, upsert the index.

        Returns how many dirty studies were looked at and how many of them got a vector.
        """
        study_pks = self.catalog.dirty_studies(limit=1000)
        if not study_pks:
            return 0, 0
        inputs = self.catalog.study_inputs(study_pks)
        vectors = {pk: v for pk, (imgs, rep) in inputs.items() if (v := study_vector(imgs, rep)) is not None}
        pks = list(vectors)
        matrix = np.stack([vectors[pk] for pk in pks]) if pks else np.empty((0, 0), dtype=np.float32)
        scores = self.model.predict_labels(matrix) if pks else matrix
        seq = self.catalog.set_study_vectors(
            {pk: (matrix[i], scores[i]) for i, pk in enumerate(pks)}, self.model.version, refreshed=study_pks
        )
        self.index.upsert(np.array(pks, dtype=np.int64), matrix, seq=seq)
        return len(study_pks), len(pks)
