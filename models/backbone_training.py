"""Fine-tuning the DenseNet121 backbone on images alone (training only; its features: ``models.backbone``).

Training is the paper's "Image D121" baseline: multi-label BCE over the 14 observations through a
linear classifier on the pooled features, plus (optionally) the image triplet loss of
``models.mmdl``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from models.backbone import FEATURE_DIM, DenseNetBackbone
from models.errors import ModelError
from models.imaging import Preprocessing, to_model_input
from models.mmdl import multilabel_triplet_loss
from models.observations import NUM_OBSERVATIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneTrainingConfig:
    """Hyper-parameters of a backbone fine-tune (saved in its checkpoints; resuming needs the same ones)."""

    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    triplet_weight: float = 0.0  # > 0 adds models.mmdl.multilabel_triplet_loss on pooled features
    triplet_margin: float = 0.2
    min_crop: float = 0.8  # augmentation: random crops keep at least this fraction of each side
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ModelError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        if not 0 < self.min_crop <= 1:
            raise ModelError(f"min_crop must be in (0, 1], got {self.min_crop}")
        if self.learning_rate <= 0 or self.triplet_weight < 0:
            raise ModelError(
                f"learning_rate must be > 0 and triplet_weight >= 0, got {self.learning_rate} and {self.triplet_weight}"
            )


@dataclass
class TrainedBackbone:
    """The fine-tuned backbone, its label classifier, and the mean loss of every epoch run."""

    backbone: DenseNetBackbone
    classifier: nn.Linear
    epoch_losses: list[float] = field(default_factory=list)


def train_backbone(
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    preprocessing: Preprocessing,
    config: BackboneTrainingConfig = BackboneTrainingConfig(),
    *,
    backbone: DenseNetBackbone | None = None,
    device: str | torch.device = "cpu",
    checkpoint: Path | None = None,
    progress: bool = True,
) -> TrainedBackbone:
    """Fine-tune a backbone (random DenseNet121 when None) on 2-D [0, 1] images and binary labels.

    ``labels`` is (n, 14) over OBSERVATIONS. With ``checkpoint``, state is saved after every epoch
    and a run given an existing checkpoint resumes after its last completed epoch.
    """
    targets = np.asarray(labels, dtype=np.float32)
    if targets.shape != (len(images), NUM_OBSERVATIONS):
        raise ModelError(f"labels must be ({len(images)}, {NUM_OBSERVATIONS}), got {targets.shape}")
    if len(images) < config.batch_size:
        raise ModelError(f"need at least batch_size={config.batch_size} images, got {len(images)}")
    torch.manual_seed(config.seed)
    backbone = backbone if backbone is not None else DenseNetBackbone(preprocessing.channels)
    if backbone.in_channels != preprocessing.channels:
        raise ModelError(f"backbone takes {backbone.in_channels} channels, preprocessing gives {preprocessing.channels}")
    classifier = nn.Linear(FEATURE_DIM, NUM_OBSERVATIONS)
    backbone.to(device)
    classifier.to(device)
    parameters = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    result = TrainedBackbone(backbone, classifier)
    if checkpoint is not None and checkpoint.is_file():
        _resume(checkpoint, result, optimizer, config)
    y_all = torch.from_numpy(targets)
    for epoch in range(len(result.epoch_losses), config.epochs):
        backbone.train()
        classifier.train()
        rng = np.random.default_rng([config.seed, epoch])  # per epoch, so a resumed run matches an unbroken one
        order = rng.permutation(len(images))
        batches = [order[i : i + config.batch_size] for i in range(0, len(order) - config.batch_size + 1, config.batch_size)]
        total = 0.0
        bar = tqdm(batches, desc=f"backbone epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for index in bar:
            x = to_model_input([_random_crop(images[i], config.min_crop, rng) for i in index], preprocessing)
            loss = _loss(backbone, classifier, x.to(device), y_all[index].to(device), config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        result.epoch_losses.append(total / len(batches))
        log.info("backbone epoch %d/%d: mean loss %.4f", epoch + 1, config.epochs, result.epoch_losses[-1])
        if checkpoint is not None:
            _save(checkpoint, result, optimizer, config)
    backbone.eval()
    classifier.eval()
    return result


def _loss(
    backbone: DenseNetBackbone, classifier: nn.Linear, x: torch.Tensor, y: torch.Tensor, config: BackboneTrainingConfig
) -> torch.Tensor:
    """BCE of the classifier on pooled features, plus the weighted multi-label triplet loss."""
    pooled = backbone(x)
    loss = F.binary_cross_entropy_with_logits(classifier(pooled), y)
    if config.triplet_weight > 0:
        loss = loss + config.triplet_weight * multilabel_triplet_loss(pooled, y, config.triplet_margin)
    return loss


def _random_crop(image: np.ndarray, min_crop: float, rng: np.random.Generator) -> np.ndarray:
    """A random sub-rectangle keeping at least ``min_crop`` of each side (training augmentation)."""
    rows, columns = np.shape(image)
    height = int(rng.integers(max(1, round(rows * min_crop)), rows + 1))
    width = int(rng.integers(max(1, round(columns * min_crop)), columns + 1))
    top = int(rng.integers(0, rows - height + 1))
    left = int(rng.integers(0, columns - width + 1))
    return image[top : top + height, left : left + width]


def _save(path: Path, result: TrainedBackbone, optimizer: torch.optim.Optimizer, config: BackboneTrainingConfig) -> None:
    """Write the training state atomically (a crash mid-write keeps the previous epoch)."""
    state = {
        "backbone": result.backbone.state_dict(),
        "classifier": result.classifier.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch_losses": list(result.epoch_losses),
        "config": asdict(config),
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def _resume(path: Path, result: TrainedBackbone, optimizer: torch.optim.Optimizer, config: BackboneTrainingConfig) -> None:
    """Load a checkpoint written by _save for the same configuration (epochs may grow)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = dict(state["config"], epochs=config.epochs)
        if saved != asdict(config):
            raise ModelError(f"checkpoint {path} was made with another configuration: {state['config']}")
        result.backbone.load_state_dict(state["backbone"])
        result.classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        result.epoch_losses[:] = [float(v) for v in state["epoch_losses"]]
    except ModelError:
        raise
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise ModelError(f"cannot resume from checkpoint {path}: {exc!r}") from exc
    log.info("resumed backbone training after epoch %d from %s", len(result.epoch_losses), path)
