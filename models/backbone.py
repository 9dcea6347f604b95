"""The DenseNet121 image backbone, its 1024-d features, and loading of the public checkpoint formats users bring.

``extract_features`` is the one way features are computed, for training the heads, for evaluation and at
inference; ``prepare_image`` and ``prepared_features`` are its two halves, for a pipeline that prepares the
next images while the backbone runs (the node's embedding job). With SCDA (``models.scda``) the features are
those of the crop SCDA finds on a first pass.

Formats read (all as state dicts, ``torch.load(weights_only=True)``, nothing downloaded):
- torchvision ``densenet121`` state dicts, including the legacy ``norm.1``/``conv.1`` key names
  that torchvision itself remaps, ``module.`` prefixes (DataParallel) and ``{"state_dict": ...}``
  / ``{"model": ...}`` / ``{"backbone": ...}`` wrappers; 3-channel conv0, ImageNet preprocessing;
- torchxrayvision's chest X-ray ``DenseNet`` (same key names, 1-channel conv0, an 18-output
  classifier, input scaled to [-1024, 1024] at 224 px). Its release files are pickled model
  objects; they must be turned into a state dict with torchxrayvision first (see ModelError text).
The source's classifier head is not part of the backbone and is set aside.
"""
from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from models.errors import ModelError
from models.imaging import Preprocessing, to_model_input
from models.scda import crop, scda_box

FEATURE_DIM = 1024
# Keys of a source model's head, not of the backbone: set aside when loading.
HEAD_KEY = re.compile(r"^(classifier\.|op_threshs$)")
# torchvision's own remapping of pre-0.4 DenseNet keys ("denselayer1.norm.1.weight" -> "norm1.weight").
LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
# {"state_dict": ...} / {"model": ...} wrap common training checkpoints; {"backbone": ...} is how
# models.backbone_training checkpoints and MMDL bundles (weights.pt) hold this backbone.
WRAPPER_KEYS = ("state_dict", "model", "backbone")
_SHOWN = 5


class DenseNetBackbone(nn.Module):
    """torchvision DenseNet121 body: ``features`` (as in torchvision) plus pooled 1024-d output.

    ``in_channels`` is 3 for torchvision/ImageNet checkpoints and 1 for torchxrayvision ones.
    """

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ModelError(f"backbone in_channels must be 1 or 3, got {in_channels}")
        self.in_channels = in_channels
        self.features = torchvision.models.densenet121(weights=None).features
        if in_channels != 3:
            self.features.conv0 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.features.conv0.weight)

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional activations (after the final ReLU): (n, 1024, h, w)."""
        return F.relu(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pooled features (n, 1024), what torchvision feeds its classifier."""
        return pool(self.feature_maps(x))


def pool(maps: torch.Tensor) -> torch.Tensor:
    """Global average pooling of (n, c, h, w) activations to (n, c)."""
    return F.adaptive_avg_pool2d(maps, 1).flatten(1)


@dataclass(frozen=True)
class LoadedBackbone:
    """A backbone read from a checkpoint, with the preprocessing its weights expect."""

    backbone: DenseNetBackbone
    preprocessing: Preprocessing
    source_format: str  # "torchvision" or "torchxrayvision"
    head_keys: tuple[str, ...]  # the source's classifier entries, not loaded


def load_backbone_checkpoint(source: str | Path | Mapping[str, Any]) -> LoadedBackbone:
    """Build a DenseNetBackbone from a checkpoint file (or an already loaded checkpoint object).

    Raises ModelError naming the missing / unexpected / mis-shaped keys when it does not fit.
    """
    checkpoint = _read_checkpoint(Path(source)) if isinstance(source, (str, Path)) else source
    state, head_keys = _backbone_state(checkpoint)
    conv0 = state.get("features.conv0.weight")
    in_channels = int(conv0.shape[1]) if conv0 is not None and conv0.ndim == 4 else 3
    if in_channels not in (1, 3):
        raise ModelError(f"features.conv0.weight takes {in_channels} input channels; only 1 or 3 are supported")
    backbone = DenseNetBackbone(in_channels)
    _check_keys(backbone, state)
    backbone.load_state_dict(state, strict=True)
    if in_channels == 1:
        return LoadedBackbone(backbone, Preprocessing.torchxrayvision(), "torchxrayvision", head_keys)
    return LoadedBackbone(backbone, Preprocessing(), "torchvision", head_keys)


def _read_checkpoint(path: Path) -> Any:
    """torch.load with weights_only=True: a checkpoint file is data, never code to run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"checkpoint file not found: {str(path)!r}") from exc
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{str(path)!r} cannot be loaded safely as a state dict of tensors ({first_line}). If it is a "
            "pickled model object (torchxrayvision's release files are), save its state dict with the "
            "library that made it, e.g. torch.save(xrv.models.DenseNet(weights='densenet121-res224-all')"
            ".state_dict(), 'densenet.pt')"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ModelError(f"{str(path)!r} is not a readable PyTorch checkpoint: {exc}") from exc


def _backbone_state(checkpoint: Any) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Unwrap, strip 'module.', remap legacy names; split into backbone entries and head keys."""
    while isinstance(checkpoint, Mapping) and any(isinstance(checkpoint.get(k), Mapping) for k in WRAPPER_KEYS):
        checkpoint = next(checkpoint[k] for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping))
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelError(f"checkpoint is not a state dict of tensors (got {type(checkpoint).__name__})")
    state: dict[str, torch.Tensor] = {}
    head: list[str] = []
    for key, value in checkpoint.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        key = LEGACY_KEY.sub(r"\1\2", key)
        if HEAD_KEY.match(key):
            head.append(key)
        else:
            state[key] = value
    return state, tuple(head)


def _check_keys(backbone: DenseNetBackbone, state: Mapping[str, torch.Tensor]) -> None:
    """Raise one ModelError listing every way the state dict does not fit a DenseNet121 backbone."""
    expected = backbone.state_dict()
    # Checkpoints older than PyTorch 0.4 have no BatchNorm counters; load_state_dict fills them in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(found)} {what} (e.g. {', '.join(found[:_SHOWN])})"
        for what, found in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mis_shaped))
        if found
    ]
    if problems:
        raise ModelError("checkpoint is not a DenseNet121 backbone: " + "; ".join(problems))


@dataclass(frozen=True)
class PreparedImage:
    """One image made ready for the backbone, work that can run beside the model (``prepare_image``).

    ``tensor`` is its normalised (channels, size, size) input, exactly the row ``to_model_input`` gives
    it in any batch; ``image`` is the 2-D original, kept only when SCDA will crop it after a first pass.
    """

    tensor: torch.Tensor
    image: np.ndarray | None = None


def prepare_image(image: np.ndarray, preprocessing: Preprocessing, *, scda: bool) -> PreparedImage:
    """Resize and normalise one 2-D [0, 1] image (ModelError if it is not one); keeps it for SCDA."""
    return PreparedImage(to_model_input([image], preprocessing)[0], np.asarray(image) if scda else None)


@torch.no_grad()
def extract_features(
    backbone: DenseNetBackbone,
    images: Sequence[np.ndarray],
    preprocessing: Preprocessing,
    *,
    scda: bool,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """(n, 1024) float32 average-pooled backbone features of 2-D [0, 1] images.

    With ``scda`` the image is first run whole to find its SCDA box (models.scda), and the
    features are those of that crop. ``device`` moves the backbone there (None: where it is).
    The backbone is used in eval mode and left in the mode it came in.
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be positive, got {batch_size}")
    features = np.zeros((len(images), FEATURE_DIM), dtype=np.float32)
    for start in range(0, len(images), batch_size):  # prepared a batch at a time: bounded memory
        batch = [prepare_image(image, preprocessing, scda=scda) for image in images[start : start + batch_size]]
        features[start : start + len(batch)] = prepared_features(
            backbone, batch, preprocessing, scda=scda, batch_size=batch_size, device=device
        )
    return features


@torch.no_grad()
def prepared_features(
    backbone: DenseNetBackbone,
    prepared: Sequence[PreparedImage],
    preprocessing: Preprocessing,
    *,
    scda: bool,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """``extract_features`` of images already made ready by ``prepare_image`` (same numbers).

    Only the backbone's passes (and, with ``scda``, the box and the crop between them) run here,
    so a caller can prepare the next batch in other threads meanwhile.
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be positive, got {batch_size}")
    if scda and any(p.image is None for p in prepared):
        raise ModelError("SCDA needs the original images: prepare them with scda=True")
    if device is not None:
        backbone.to(device)
    target = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features = np.zeros((len(prepared), FEATURE_DIM), dtype=np.float32)
    try:
        for start in range(0, len(prepared), batch_size):
            batch = prepared[start : start + batch_size]
            inputs = torch.stack([p.tensor for p in batch]).to(target)
            if scda:
                maps = backbone.feature_maps(inputs).cpu().numpy()
                crops = [crop(p.image, scda_box(m, np.shape(p.image))) for p, m in zip(batch, maps)]
                inputs = to_model_input(crops, preprocessing).to(target)
            features[start : start + len(batch)] = backbone(inputs).cpu().numpy()
    finally:
        backbone.train(was_training)
    return features
