"""The embedding job on a real catalog, index and (random, 64 px) model: results, failures, time limit, overlap."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from dicom_node.server import decode_stored_image
from indexer.catalog import Catalog, InstanceAttrs, SeriesAttrs, StudyAttrs
from indexer.embedding import EmbeddingJob, Encoder
from indexer.schema import Instance, Kind, State
from indexer.vector_index import HnswParams, VectorIndex
from models.bundle import MMDLModel
from models.imaging import to_model_input
from models.mmdl import EMBEDDING_DIM
from tests.dicom_node.builders import dx_synthetic

BATCH = 4


@pytest.fixture(scope="module")
def model(random_model_dir: Path) -> MMDLModel:
    return MMDLModel.load(random_model_dir, device="cpu")


@pytest.fixture()
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    cat = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    yield cat
    cat.close()


def store(catalog: Catalog, root: Path, count: int, broken: Sequence[int] = ()) -> list[str]:
    """``count`` one-image studies written under ``root`` and cataloged as pending; ``broken`` ones are junk."""
    root.mkdir(exist_ok=True)
    names = []
    for i in range(count):
        ds = dx_synthetic(generate_uid(), f"P{i}", f"A{i}", size=40, seed=i)
        path = root / f"{i:03d}.dcm"
        if i in broken:
            path.write_bytes(b"not a DICOM file")
        else:
            ds.save_as(path, enforce_file_format=True)
        catalog.add_instance(StudyAttrs(ds.StudyInstanceUID), SeriesAttrs(ds.SeriesInstanceUID),
                             InstanceAttrs(ds.SOPInstanceUID, ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID),
                                           path.name, path.stat().st_size, Kind.IMAGE))
        names.append(path.name)
    return names


def make_job(catalog: Catalog, root: Path, encoder: Encoder, decode: Callable[[Path], np.ndarray] = decode_stored_image,
             max_seconds: float = 60.0) -> EmbeddingJob:
    index = VectorIndex(HnswParams(EMBEDDING_DIM), root.parent / "index")
    return EmbeddingJob(catalog, index, root, load_model=lambda: encoder, decode=decode, batch_size=BATCH,
                        decode_workers=2, max_seconds=max_seconds)


def rows(catalog: Catalog) -> dict[str, tuple[State, str, np.ndarray | None]]:
    """Each image's (state, reason, vector) by file name."""
    with catalog.session() as session:
        return {i.path: (i.state, i.reason, None if i.vector is None else np.frombuffer(i.vector, dtype=np.float32))
                for i in session.query(Instance)}


def test_vectors_are_the_models_and_studies_reach_the_index(catalog: Catalog, tmp_path: Path, model: MMDLModel) -> None:
    names = store(catalog, tmp_path / "storage", 2 * BATCH + 1)
    job = make_job(catalog, tmp_path / "storage", model)
    stats = job.run()
    job.close()
    assert (stats.images, stats.failed, stats.studies) == (len(names), 0, len(names))
    expected = model.embed_images([decode_stored_image(tmp_path / "storage" / n) for n in names])
    found = rows(catalog)
    for name, vector in zip(names, expected):
        state, _, stored = found[name]
        assert state is State.INDEXED
        np.testing.assert_allclose(stored, vector, rtol=1e-4, atol=1e-5)
    assert len(job.index) == len(names)
    assert catalog.pending_images(100) == []


def test_each_bad_image_fails_alone_with_its_reason(catalog: Catalog, tmp_path: Path, model: MMDLModel) -> None:
    names = store(catalog, tmp_path / "storage", 6, broken=[1])

    def decode(path: Path) -> np.ndarray:
        if path.name == names[4]:
            return np.zeros((3,), dtype=np.float32)  # decodes, but is no 2-D image: preprocessing refuses it
        return decode_stored_image(path)

    job = make_job(catalog, tmp_path / "storage", model, decode)
    stats = job.run()
    job.close()
    found = rows(catalog)
    assert (stats.images, stats.failed) == (4, 2)
    assert found[names[1]][0] is State.FAILED and "DICOM" in found[names[1]][1]
    assert found[names[4]][0] is State.FAILED and "2-D" in found[names[4]][1]
    assert all(found[n][0] is State.INDEXED for i, n in enumerate(names) if i not in (1, 4))


class Culprit:
    """The model, except that a batch holding the marked image fails (as a model error would)."""

    def __init__(self, model: MMDLModel, marked: bytes) -> None:
        self.model, self.marked, self.version = model, marked, model.version

    def prepare_image(self, image: np.ndarray) -> Any:
        return (self.model.prepare_image(image), image.tobytes() == self.marked)

    def embed_prepared(self, prepared: Sequence[Any]) -> np.ndarray:
        if any(flag for _, flag in prepared):
            raise RuntimeError("this input breaks the backbone")
        return self.model.embed_prepared([p for p, _ in prepared])

    def embed_reports(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.embed_reports(texts)

    def predict_labels(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.predict_labels(embeddings)


def test_an_image_that_breaks_the_model_fails_alone(catalog: Catalog, tmp_path: Path, model: MMDLModel) -> None:
    names = store(catalog, tmp_path / "storage", BATCH)
    marked = decode_stored_image(tmp_path / "storage" / names[2]).tobytes()
    job = make_job(catalog, tmp_path / "storage", Culprit(model, marked))
    stats = job.run()
    job.close()
    found = rows(catalog)
    assert found[names[2]][:2] == (State.FAILED, "RuntimeError: this input breaks the backbone")
    assert stats.images == BATCH - 1 and all(found[n][0] is State.INDEXED for n in names if n != names[2])


class Slow(Culprit):
    """The model, taking ``seconds`` longer per batch."""

    def __init__(self, model: MMDLModel, seconds: float) -> None:
        super().__init__(model, marked=b"")
        self.seconds = seconds

    def embed_prepared(self, prepared: Sequence[Any]) -> np.ndarray:
        time.sleep(self.seconds)
        return super().embed_prepared(prepared)


def test_max_seconds_ends_a_run_and_the_rest_stays_pending(catalog: Catalog, tmp_path: Path, model: MMDLModel) -> None:
    names = store(catalog, tmp_path / "storage", 5 * BATCH)
    job = make_job(catalog, tmp_path / "storage", Slow(model, 0.3), max_seconds=0.5)
    first = job.run()
    assert first.images in (BATCH, 2 * BATCH)  # each batch takes >= 0.3 s: at most two start within 0.5 s
    assert len(catalog.pending_images(100)) == len(names) - first.images
    job.max_seconds = 60.0
    second = job.run()
    job.close()
    assert first.images + second.images == len(names)
    assert all(state is State.INDEXED for state, _, _ in rows(catalog).values())


def test_next_batch_is_decoded_while_the_model_runs(catalog: Catalog, tmp_path: Path, model: MMDLModel) -> None:
    names = store(catalog, tmp_path / "storage", 2 * BATCH)
    second_batch_decoding = threading.Event()
    overlapped: list[bool] = []

    def decode(path: Path) -> np.ndarray:
        if path.name in names[BATCH:]:
            second_batch_decoding.set()
        return decode_stored_image(path)

    class Watching(Culprit):
        def embed_prepared(self, prepared: Sequence[Any]) -> np.ndarray:
            if not overlapped:  # the first batch: does the pool work on the second meanwhile?
                overlapped.append(second_batch_decoding.wait(timeout=10))
            return super().embed_prepared(prepared)

    job = make_job(catalog, tmp_path / "storage", Watching(model, marked=b""), decode)
    stats = job.run()
    job.close()
    assert overlapped == [True]
    assert stats.images == len(names)


@pytest.mark.parametrize("scda", [True, False])
def test_prepared_in_the_pool_gives_the_same_numbers_as_embed_images(model: MMDLModel, scda: bool) -> None:
    variant = MMDLModel(model.backbone, model.heads, model.report_encoder, model.preprocessing, scda=scda,
                        version=model.version, device="cpu")
    images = [np.random.default_rng(i).random((40 + 8 * i, 48), dtype=np.float32) for i in range(3)]
    prepared = [variant.prepare_image(i) for i in images]
    batch = to_model_input(images, model.preprocessing)  # what a whole batch is turned into
    np.testing.assert_array_equal(torch.stack([p.tensor for p in prepared]).numpy(), batch.numpy())
    np.testing.assert_array_equal(variant.embed_prepared(prepared), variant.embed_images(images))


class FailingOnce(Catalog):
    """A catalog whose first save of results fails, as a full disk would make it."""

    failed = False

    def save_results(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            self.failed = True
            raise OSError("no space left on device")
        super().save_results(*args, **kwargs)


def test_a_failed_write_ends_the_run_with_its_error_and_nothing_is_lost(tmp_path: Path, model: MMDLModel) -> None:
    catalog = FailingOnce(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    names = store(catalog, tmp_path / "storage", 2 * BATCH)
    job = make_job(catalog, tmp_path / "storage", model)
    with pytest.raises(OSError, match="no space"):
        job.run()
    assert len(catalog.pending_images(100)) == len(names)  # the failed write and the one not started
    stats = job.run()
    job.close()
    assert stats.images == len(names)
    assert all(state is State.INDEXED for state, _, _ in rows(catalog).values())
    assert len(job.index) == len(names)
    catalog.close()
