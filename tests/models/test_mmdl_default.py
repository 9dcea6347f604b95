"""The shipped model (models/mmdl_default): loads by default, is self-contained, carries its evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.bundle import DEFAULT_MODEL_DIR, MMDLModel
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
    metrics = json.loads((DEFAULT_MODEL_DIR / "metrics.json").read_text())
    assert metrics == shipped.metrics
    assert set(MAIN_METHODS) <= set(metrics)
    for method in MAIN_METHODS:
        assert 0.0 <= metrics[method]["map@10"] <= 1.0
    card = (DEFAULT_MODEL_DIR.parent / "MODEL_CARD.md").read_text()
    assert f"{metrics['MMDL']['map@10']:.3f}" in card  # the card quotes the measured numbers


def test_shipped_model_embeds_a_real_image_and_report(shipped: MMDLModel, shared_data: Path) -> None:
    image = load_image(next(iter(sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png")))))
    h_image = shipped.embed_images([image])
    h_report = shipped.embed_reports(["Large right pleural effusion. The heart is enlarged."])
    assert h_image.shape == h_report.shape == (1, 512)
    scores = shipped.predict_labels(np.concatenate([h_image, h_report]))
    assert scores.shape == (2, 14) and np.isfinite(scores).all()
