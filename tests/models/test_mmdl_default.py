"""The shipped model (models/mmdl_default): loads by default, is self-contained, carries its evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import MMDLModel
from models.bundle_manifest import DEFAULT_MODEL_DIR
from models.calibration import MIN_POSITIVES
from models.evaluate import MAIN_METHODS
from models.imaging import load_image
from models.observations import OBSERVATIONS

LICENCE_FILES = (
    "NIH_README_ChestXray.txt",
    "torchxrayvision_LICENSE.txt",
    "covid-chestxray_SOURCE_README.md",
    "iu-reports_LICENSE_NOTE.txt",
)


@pytest.fixture(scope="module")
def shipped() -> MMDLModel:
    return MMDLModel.load(DEFAULT_MODEL_DIR, device="cpu")


def test_shipped_model_is_small_and_self_contained(shipped: MMDLModel) -> None:
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir() if f.is_file())
    assert size < 60_000_000
    for name in LICENCE_FILES:
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    assert shipped.label_names == OBSERVATIONS
    assert shipped.training["test_fraction"] > 0  # evaluated on patients it did not see


def test_shipped_model_carries_its_evaluation(shipped: MMDLModel) -> None:
    metrics = shipped.metrics
    assert set(MAIN_METHODS) <= set(metrics)
    for method in ("Image-D121", "Image-MMDL", "MMDL"):
        assert metrics[method]["map@10"] > metrics["Random"]["map@10"] + 0.1  # well above the random floor
    card = (DEFAULT_MODEL_DIR.parent / "MODEL_CARD.md").read_text()
    assert f"{metrics['MMDL']['map@10']:.3f}" in card  # the card quotes the measured numbers


def test_shipped_model_carries_its_calibration_and_split(shipped: MMDLModel) -> None:
    calibration = shipped.calibration
    assert calibration is not None and calibration.model_version == shipped.version
    assert calibration.fitted_on["validation_fraction"] > 0  # fitted on training patients, not the test split
    assert any(f.slope is not None for f in calibration.findings)
    assert all(f.positives >= MIN_POSITIVES for f in calibration.findings if f.slope is not None)
    assert len(shipped.training["test_patients_sha256"]) == 64


# A fingerprint of h for two sample images: its norm and 4 fixed random projections (seeded). Measured
# with the shipped model; float noise across machines is ~1e-5, a preprocessing change moves them by >0.1.
REFERENCE_IMAGES = ("00000061_012.png", "00000061_015.png")
REFERENCE_NORMS = (3.71373, 4.69259)
REFERENCE_PROJECTIONS = ((-0.21095, -0.19293, -0.34159, -0.20298), (-0.24615, -0.33957, -0.4913, -0.19177))


def test_shipped_model_reproduces_reference_embeddings(shipped: MMDLModel, shared_data: Path) -> None:
    images = [load_image(shared_data / "nih-cxr14-1000" / "images" / name) for name in REFERENCE_IMAGES]
    h = shipped.embed_images(images)
    probe = np.random.default_rng(0).standard_normal((512, 4)) / np.sqrt(512)
    assert np.linalg.norm(h, axis=1) == pytest.approx(REFERENCE_NORMS, abs=1e-3)
    assert (h @ probe).tolist() == [pytest.approx(row, abs=1e-3) for row in REFERENCE_PROJECTIONS]


def test_shipped_model_embeds_a_real_image_and_report(shipped: MMDLModel, shared_data: Path) -> None:
    image = load_image(next(iter(sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png")))))
    h_image = shipped.embed_images([image])
    h_report = shipped.embed_reports(["Large right pleural effusion. The heart is enlarged."])
    assert h_image.shape == h_report.shape == (1, 512)
    scores = shipped.predict_labels(np.concatenate([h_image, h_report]))
    assert scores.shape == (2, 14) and np.isfinite(scores).all()
