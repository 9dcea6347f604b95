"""Backbone fine-tuning (a few steps on tiny images) and feature extraction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbone import DenseNetBackbone, extract_features, load_backbone_checkpoint
from models.backbone_training import BackboneTrainingConfig, train_backbone
from models.errors import ModelError
from models.imaging import Preprocessing, to_model_input
from models.observations import NUM_OBSERVATIONS
from models.scda import crop, scda_box

PRE = Preprocessing(size=64)
TINY = Preprocessing(size=32)  # DenseNet121 at 32 px: enough to train a few steps quickly


def toy_set(n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Images with a bright blob at the top (label 0) or the bottom (label 1), different sizes."""
    rng = np.random.default_rng(0)
    images, labels = [], np.zeros((n, NUM_OBSERVATIONS), dtype=np.float32)
    for i in range(n):
        rows, columns = 72 + 4 * (i % 3), 64 + 8 * (i % 2)
        image = rng.uniform(0.0, 0.2, size=(rows, columns)).astype(np.float32)
        bottom = i % 2
        image[rows // 2 * bottom : rows // 2 * (bottom + 1), 10:50] += 0.7
        images.append(image)
        labels[i, bottom] = 1.0
    return images, labels


def test_a_few_steps_lower_the_loss() -> None:
    images, labels = toy_set(4)
    config = BackboneTrainingConfig(epochs=3, batch_size=2, learning_rate=1e-3, triplet_weight=0.5)
    result = train_backbone(images, labels, TINY, config, progress=False)
    assert len(result.epoch_losses) == 3
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]
    assert not result.backbone.training


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    images, labels = toy_set(4)
    checkpoint = tmp_path / "backbone.ckpt"
    two = BackboneTrainingConfig(epochs=2, batch_size=2)
    unbroken = train_backbone(images, labels, TINY, two, progress=False)
    train_backbone(images, labels, TINY, BackboneTrainingConfig(epochs=1, batch_size=2), checkpoint=checkpoint, progress=False)
    resumed = train_backbone(images, labels, TINY, two, checkpoint=checkpoint, progress=False)
    np.testing.assert_allclose(resumed.epoch_losses, unbroken.epoch_losses, rtol=1e-4)
    x = to_model_input(images[:2], TINY)
    with torch.no_grad():
        torch.testing.assert_close(resumed.backbone(x), unbroken.backbone(x), rtol=1e-3, atol=1e-4)
    from_checkpoint = load_backbone_checkpoint(checkpoint).backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(from_checkpoint(x), resumed.backbone(x))
    with pytest.raises(ModelError, match="another configuration"):
        train_backbone(images, labels, TINY, BackboneTrainingConfig(epochs=3, batch_size=4), checkpoint=checkpoint)


def test_training_input_checks() -> None:
    images, labels = toy_set(3)
    with pytest.raises(ModelError, match="labels must be"):
        train_backbone(images, labels[:, :3], PRE)
    with pytest.raises(ModelError, match="at least batch_size"):
        train_backbone(images, labels, PRE, BackboneTrainingConfig(batch_size=8))
    with pytest.raises(ModelError, match="channels"):
        train_backbone(images, labels, PRE, BackboneTrainingConfig(batch_size=2), backbone=DenseNetBackbone(1))


def test_extract_features_with_and_without_scda() -> None:
    torch.manual_seed(0)
    backbone = DenseNetBackbone().train()
    images, _ = toy_set(3)
    plain = extract_features(backbone, images, PRE, scda=False, batch_size=2)
    assert plain.shape == (3, 1024) and plain.dtype == np.float32
    assert backbone.training  # mode restored
    backbone.eval()
    with torch.no_grad():
        np.testing.assert_allclose(plain, backbone(to_model_input(images, PRE)).numpy(), rtol=1e-4, atol=1e-5)
        maps = backbone.feature_maps(to_model_input(images[:1], PRE)).numpy()[0]
        box = scda_box(maps, images[0].shape)
        expected = backbone(to_model_input([crop(images[0], box)], PRE)).numpy()
    with_scda = extract_features(backbone, images, PRE, scda=True, batch_size=2, device="cpu")
    np.testing.assert_allclose(with_scda[0], expected[0], rtol=1e-4, atol=1e-5)
    assert with_scda.shape == (3, 1024)
    assert extract_features(backbone, [], PRE, scda=True).shape == (0, 1024)
