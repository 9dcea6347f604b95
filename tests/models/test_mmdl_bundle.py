"""The model bundle the node loads: the API contract, save/load round trip, and broken directories."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.bundle import (
    WEIGHTS,
    MMDLModel,
    create_random_model,
    resolve_device,
    update_manifest,
)
from models.bundle_manifest import DEFAULT_MODEL_DIR, MANIFEST
from models.errors import ModelError
from models.observations import OBSERVATIONS

REPORTS = ["The heart is enlarged with a small left effusion.", "Lungs are clear. No pneumothorax.", ""]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[MMDLModel, Path]:
    directory = tmp_path_factory.mktemp("bundle")
    return create_random_model(directory, seed=3, device="cpu"), directory


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((70, 60), dtype=np.float32), rng.random((48, 64), dtype=np.float32)]


def test_api_contract(random_model: tuple[MMDLModel, Path]) -> None:
    model, _ = random_model
    assert model.label_names == OBSERVATIONS
    assert model.embedding_dim == 512
    assert model.device == "cpu"
    assert model.version.startswith("mmdl-")
    images = model.embed_images(_images())
    reports = model.embed_reports(REPORTS)
    assert images.shape == (2, 512) and images.dtype == np.float32
    assert reports.shape == (3, 512) and reports.dtype == np.float32
    scores = model.predict_labels(np.concatenate([images, reports]))
    assert scores.shape == (5, 14) and scores.dtype == np.float32
    assert bool(((scores > 0) & (scores < 1)).all())
    assert model.embed_images([]).shape == (0, 512)
    with pytest.raises(ModelError, match="512"):
        model.predict_labels(np.zeros((1, 300), np.float32))
    assert DEFAULT_MODEL_DIR.name == "mmdl_default"


def test_round_trip_gives_identical_embeddings(random_model: tuple[MMDLModel, Path], tmp_path: Path) -> None:
    model, _ = random_model
    model.save(tmp_path / "copy")
    loaded = MMDLModel.load(tmp_path / "copy", device="cpu")
    assert loaded.version == model.version
    assert loaded.scda == model.scda and loaded.preprocessing == model.preprocessing
    np.testing.assert_array_equal(loaded.embed_images(_images()), model.embed_images(_images()))
    np.testing.assert_array_equal(loaded.embed_reports(REPORTS), model.embed_reports(REPORTS))


def test_random_models_differ_by_seed(random_model: tuple[MMDLModel, Path], tmp_path: Path) -> None:
    model, _ = random_model
    other = create_random_model(tmp_path / "other", seed=4, device="cpu")
    assert other.version != model.version
    assert not np.allclose(other.embed_reports(REPORTS[:1]), model.embed_reports(REPORTS[:1]))


def test_weights_are_stored_small(random_model: tuple[MMDLModel, Path]) -> None:
    _, directory = random_model
    assert (directory / WEIGHTS).stat().st_size < 25_000_000  # float16: DenseNet121 + heads ~ 20 MB


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: shutil.rmtree(d), "not found"),
        (lambda d: (d / MANIFEST).unlink(), "model.json is missing"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "cannot read"),
        (lambda d: (d / MANIFEST).write_text(json.dumps({"format": "other"})), "not an mmdl-bundle"),
        (lambda d: (d / WEIGHTS).write_bytes(b"garbage"), "checksum"),
        (lambda d: (d / "doc2vec.model").unlink(), "missing"),
    ],
)
def test_broken_directories_raise_model_error(
    random_model: tuple[MMDLModel, Path], tmp_path: Path, damage: Callable[[Path], object], message: str
) -> None:
    _, directory = random_model
    copy = tmp_path / "m"
    shutil.copytree(directory, copy)
    damage(copy)
    with pytest.raises(ModelError, match=message):
        MMDLModel.load(copy, device="cpu")


def test_incomplete_manifest_raises_model_error(random_model: tuple[MMDLModel, Path], tmp_path: Path) -> None:
    _, directory = random_model
    copy = tmp_path / "m"
    shutil.copytree(directory, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["image"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="incomplete"):
        MMDLModel.load(copy, device="cpu")


def test_device_is_checked() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ModelError, match="tpu"):
        resolve_device("tpu")


def test_calibration_is_stored_in_the_manifest_and_loaded_with_the_model(
    random_model: tuple[MMDLModel, Path], tmp_path: Path
) -> None:
    model, _ = random_model
    model.save(tmp_path / "copy")
    assert MMDLModel.load(tmp_path / "copy", device="cpu").calibration is None
    shipped = MMDLModel.load(DEFAULT_MODEL_DIR, device="cpu").calibration
    assert shipped is not None
    calibration = replace(shipped, model_version=model.version)
    update_manifest(tmp_path / "copy", calibration, {"test_patients_sha256": "ab" * 32})
    loaded = MMDLModel.load(tmp_path / "copy", device="cpu")  # checksums of the other files still hold
    assert loaded.calibration == calibration and loaded.training["test_patients_sha256"] == "ab" * 32
    loaded.save(tmp_path / "again")  # a model saved again keeps its calibration
    assert MMDLModel.load(tmp_path / "again", device="cpu").calibration == calibration
