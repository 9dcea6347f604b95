"""Training MMDL from a list of samples, in the order that keeps it cheap on a CPU.

1. Doc2Vec on every report of the training samples (unsupervised, so unlabelled notes count too).
2. The DenseNet121 backbone fine-tuned once on the labelled images (``models.backbone_training``).
3. SCDA image features of every image, computed once and cached on disk (``FeatureCache``).
4. The MMDL heads + P trained on cached image features and Doc2Vec vectors: seconds per run, so the
   baselines and the report-coverage experiment can retrain heads many times.

Images without reports and reports without images both train: each modality's batch comes from
its own pool. ``report_fraction`` keeps the reports of that share of the samples (chosen per
study by a seeded hash): a paired sample that loses its report keeps its image, a report-only
sample that loses it is dropped. Every stage resumes from its file in ``work_dir``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.backbone import DenseNetBackbone, extract_features, load_backbone_checkpoint
from models.backbone_training import BackboneTrainingConfig, train_backbone
from models.bundle import MMDLModel, resolve_device, round_to_stored_precision
from models.datasets import split_by_patient
from models.errors import ModelError
from models.imaging import Preprocessing, load_image
from models.mmdl import MMDLHeads, mmdl_loss
from models.observations import NUM_OBSERVATIONS, Sample
from models.text import DEFAULT_DIM, ReportEncoder

log = logging.getLogger(__name__)

REPORT_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0)
#: Images are kept in memory at most this many pixels on a side (the data's PNGs are <= 512).
MAX_SIDE = 512


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of the MMDL heads + P, trained on cached features."""

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    triplet_weight: float = 1.0
    margin: float = 0.2
    dropout: float = 0.2
    seed: int = 0
    report_weight: float = 1.0  # weight of the report label loss against the image one

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.learning_rate <= 0 or self.triplet_weight < 0 \
                or self.report_weight < 0:
            raise ModelError(f"bad head training settings: {self}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (stored in the model's model.json)."""

    image_size: int = 224
    scda: bool = True
    report_fraction: float = 1.0
    doc2vec_dim: int = DEFAULT_DIM
    doc2vec_epochs: int = 40
    backbone: BackboneTrainingConfig = field(default_factory=BackboneTrainingConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.report_fraction <= 1.0:
            raise ModelError(f"report_fraction must be between 0 and 1, got {self.report_fraction}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Inverse of to_dict; ModelError for a record that does not fit."""
        try:
            return cls(
                **{k: v for k, v in values.items() if k not in ("backbone", "heads")},
                backbone=BackboneTrainingConfig(**values["backbone"]),
                heads=HeadConfig(**values["heads"]),
            )
        except (KeyError, TypeError) as exc:
            raise ModelError(f"bad training configuration record: {exc!r}") from exc


def training_split(samples: Sequence[Sample], test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples split by patient; test is empty for a fraction of 0."""
    if not 0.0 <= test_fraction <= 0.9:
        raise ModelError(f"test fraction must be between 0 and 0.9, got {test_fraction}")
    if test_fraction == 0.0:
        return list(samples), []
    train, test = split_by_patient(samples, [1.0 - test_fraction, test_fraction], seed=seed)
    return train, test


def report_kept(sample: Sample, fraction: float, seed: int = 0) -> bool:
    """Whether the sample's report is among the ``fraction`` kept (a seeded hash of the sample)."""
    if fraction >= 1.0:
        return True
    draw = hashlib.sha256(f"{seed}:{sample.source}:{sample.study_id}:{sample.image}".encode()).digest()
    return int.from_bytes(draw[:8], "little") / 2**64 < fraction


def keep_reports(samples: Sequence[Sample], fraction: float, seed: int = 0) -> list[Sample]:
    """Samples with the reports of only ``fraction`` of them (see the module docstring)."""
    kept: list[Sample] = []
    for s in samples:
        if not s.report or report_kept(s, fraction, seed):
            kept.append(s)
        elif s.image is not None:
            kept.append(replace(s, report=None))
    return kept


def read_image(path: Path) -> np.ndarray:
    """A 2-D [0, 1] image at most MAX_SIDE pixels on a side (aspect kept), to bound memory."""
    image = load_image(path)
    scale = MAX_SIDE / max(image.shape)
    if scale >= 1.0:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    return np.asarray(picture.resize(size, Image.BILINEAR), dtype=np.float32)


def digest(*parts: object) -> str:
    """Short stable hash of JSON-able parts (and numpy arrays): names resumable work files by their inputs."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, default=str).encode())
    return hasher.hexdigest()[:16]


def backbone_digest(backbone: DenseNetBackbone) -> str:
    """Short hash of the backbone weights: the key of its cached features."""
    return digest(list(backbone.state_dict()), *(v.detach().cpu().numpy() for v in backbone.state_dict().values()))


class FeatureCache:
    """Image features on disk, one .npz per (backbone weights, preprocessing, SCDA) setting."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def features(
        self,
        backbone: DenseNetBackbone,
        paths: Sequence[Path],
        preprocessing: Preprocessing,
        scda: bool,
        device: str,
        progress: bool = True,
        chunk: int = 32,
    ) -> np.ndarray:
        """(n, 1024) features of the images at ``paths``, computing (and saving) only the missing ones."""
        file = self.directory / f"features-{digest(backbone_digest(backbone), preprocessing.to_dict(), scda)}.npz"
        known: dict[str, np.ndarray] = {}
        if file.is_file():
            with np.load(file) as stored:
                known = dict(zip(stored["paths"].tolist(), stored["features"]))
        missing = sorted({str(p) for p in paths} - known.keys())
        bar = tqdm(total=len(missing), desc="image features", unit="img", disable=not progress or not missing)
        for start in range(0, len(missing), chunk):
            names = missing[start : start + chunk]
            images = [read_image(Path(n)) for n in names]
            found = extract_features(backbone, images, preprocessing, scda=scda, device=device)
            known.update(zip(names, found))
            self._write(file, known)
            bar.update(len(names))
        bar.close()
        if not paths:
            return np.zeros((0, 1024), dtype=np.float32)
        return np.stack([known[str(p)] for p in paths]).astype(np.float32)

    def _write(self, file: Path, known: dict[str, np.ndarray]) -> None:
        """Save atomically, so an interrupted run keeps what it had computed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(file.stem + ".partial.npz")
        names = sorted(known)
        np.savez(partial, paths=np.array(names), features=np.stack([known[n] for n in names]))
        partial.replace(file)


def labelled_images(samples: Sequence[Sample]) -> list[Sample]:
    """Samples that have an image and labels (what supervised image training can use)."""
    return [s for s in samples if s.image is not None and s.labels is not None]


def labelled_reports(samples: Sequence[Sample]) -> list[Sample]:
    """Samples that have report text and labels."""
    return [s for s in samples if s.report and s.report.strip() and s.labels is not None]


def label_matrix(samples: Sequence[Sample]) -> np.ndarray:
    """(n, 14) float32 labels of labelled samples."""
    return np.array([s.labels for s in samples], dtype=np.float32).reshape(len(samples), NUM_OBSERVATIONS)


def train_heads(
    image_x: np.ndarray,
    image_y: np.ndarray,
    report_x: np.ndarray,
    report_y: np.ndarray,
    config: HeadConfig,
    device: str = "cpu",
    checkpoint: Path | None = None,
    progress: bool = True,
) -> tuple[MMDLHeads, list[float]]:
    """Train MMDL heads + P on image features and/or report vectors (either may have 0 rows).

    Each step takes one batch of images and one of reports, each from its own shuffled pool
    (cycled), so the modalities need no pairing. Returns the heads (eval mode) and per-epoch losses.
    Deterministic for a seed; resumes from ``checkpoint`` (written after every epoch).
    """
    if len(image_x) == 0 and len(report_x) == 0:
        raise ModelError("nothing to train the heads on: no labelled image and no labelled report")
    torch.manual_seed(config.seed)
    heads = MMDLHeads(image_dim=image_x.shape[1], report_dim=report_x.shape[1], dropout=config.dropout)
    pools = {
        name: (torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.float32)))
        for name, x, y in (("image", image_x, image_y), ("report", report_x, report_y))
        if len(x) > 0
    }
    for name, (x, _) in pools.items():
        heads.set_input_statistics(name, x)
    heads.to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    losses: list[float] = []
    if checkpoint is not None and checkpoint.is_file():
        losses = _resume_heads(checkpoint, heads, optimizer, config)
    # An epoch is one pass over the images (over the reports when there are none); the report pool
    # is cycled across epochs, so every report is used while an epoch costs what the images need.
    lead = pools["image"] if "image" in pools else pools["report"]
    steps = math.ceil(len(lead[0]) / config.batch_size)
    bar = tqdm(range(len(losses), config.epochs), desc="MMDL heads", unit="epoch", disable=not progress)
    for epoch in bar:
        heads.train()
        draw = steps * config.batch_size
        orders = {name: cycled_order(len(x), epoch, draw, config.seed) for name, (x, _) in pools.items()}
        total = 0.0
        for step in range(steps):
            batch = {}
            for name, (x, y) in pools.items():
                index = torch.from_numpy(orders[name][step * config.batch_size : (step + 1) * config.batch_size])
                batch[name] = (x[index].to(device), y[index].to(device))
            loss, _ = mmdl_loss(heads, batch, triplet_weight=config.triplet_weight, margin=config.margin,
                                report_weight=config.report_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / steps)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if checkpoint is not None:
            _save_heads(checkpoint, heads, optimizer, config, losses)
    heads.eval()
    return heads, losses


def cycled_order(size: int, epoch: int, count: int, seed: int) -> np.ndarray:
    """Indices ``epoch * count ... (epoch + 1) * count - 1`` of an endless sequence of seeded
    permutations of ``range(size)``: a pool larger than an epoch's draw is worked through over epochs."""
    first = epoch * count
    rounds = range(first // size, (first + count - 1) // size + 1)
    sequence = np.concatenate([np.random.default_rng([seed, r]).permutation(size) for r in rounds])
    offset = first - rounds[0] * size
    return sequence[offset : offset + count]


def _save_heads(
    path: Path, heads: MMDLHeads, optimizer: torch.optim.Optimizer, config: HeadConfig, losses: list[float]
) -> None:
    """Write the head training state atomically."""
    partial = path.with_name(path.name + ".partial")
    state = {"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "losses": losses, "config": asdict(config)}
    torch.save(state, partial)
    partial.replace(path)


def _resume_heads(path: Path, heads: MMDLHeads, optimizer: torch.optim.Optimizer, config: HeadConfig) -> list[float]:
    """Load a head checkpoint of the same configuration (epochs may grow); returns its losses."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if dict(state["config"], epochs=config.epochs) != asdict(config):
            raise ModelError(f"head checkpoint {path} was made with another configuration: {state['config']}")
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        losses = [float(v) for v in state["losses"]]
    except ModelError:
        raise
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise ModelError(f"cannot resume from head checkpoint {path}: {exc!r}") from exc
    log.info("resumed head training after epoch %d from %s", len(losses), path)
    return losses


def train_model(
    samples: Sequence[Sample],
    config: TrainConfig,
    work_dir: Path,
    device: str = "auto",
    init_backbone: Path | None = None,
    progress: bool = True,
) -> MMDLModel:
    """Train a full MMDL model (all four stages) on ``samples``; resumable through ``work_dir``."""
    device = resolve_device(device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    samples = keep_reports(samples, config.report_fraction, config.heads.seed)
    images, reports = labelled_images(samples), labelled_reports(samples)
    log.info("training on %d labelled images and %d labelled reports (%s)", len(images), len(reports), device)

    started = time.monotonic()
    encoder = _report_encoder(samples, config, work_dir)
    timings["doc2vec_s"] = time.monotonic() - started

    started = time.monotonic()
    backbone, preprocessing = _backbone(images, config, work_dir, device, init_backbone, progress)
    round_to_stored_precision(backbone)
    timings["backbone_s"] = time.monotonic() - started

    started = time.monotonic()
    cache = FeatureCache(work_dir / "cache")
    image_x = cache.features(backbone, [s.image for s in images], preprocessing, config.scda, device, progress)
    report_x = encoder.encode([s.report or "" for s in reports])
    timings["features_s"] = time.monotonic() - started

    started = time.monotonic()
    heads, losses = train_heads(
        image_x, label_matrix(images), report_x, label_matrix(reports), config.heads, device,
        checkpoint=work_dir / f"heads-{digest(asdict(config.heads), image_x, report_x, label_matrix(reports))}.ckpt",
        progress=progress,
    )
    timings["heads_s"] = time.monotonic() - started
    training = {
        "config": config.to_dict(),
        "labelled_images": len(images),
        "labelled_reports": len(reports),
        "device": device,
        "head_losses": [round(v, 5) for v in losses],
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    return MMDLModel(backbone, heads, encoder, preprocessing, scda=config.scda, training=training, device=device)


def _report_encoder(samples: Sequence[Sample], config: TrainConfig, work_dir: Path) -> ReportEncoder:
    """Doc2Vec on the samples' reports, reused from ``work_dir`` when a run on the same input saved it."""
    texts = [s.report for s in samples if s.report and s.report.strip()]
    path = work_dir / f"doc2vec-{digest(texts, config.doc2vec_dim, config.doc2vec_epochs, config.heads.seed)}.model"
    if path.is_file():
        log.info("reusing the report encoder in %s", path)
        return ReportEncoder.load(path, seed=config.heads.seed)
    encoder = ReportEncoder.train(texts, dim=config.doc2vec_dim, epochs=config.doc2vec_epochs, seed=config.heads.seed)
    encoder.save(path)
    return encoder


def _backbone(
    images: Sequence[Sample],
    config: TrainConfig,
    work_dir: Path,
    device: str,
    init_backbone: Path | None,
    progress: bool,
) -> tuple[DenseNetBackbone, Preprocessing]:
    """Fine-tune the backbone on the labelled images (from a user checkpoint when given)."""
    start, preprocessing = None, Preprocessing(size=config.image_size)
    if init_backbone is not None:
        loaded = load_backbone_checkpoint(init_backbone)
        start, preprocessing = loaded.backbone, replace(loaded.preprocessing, size=config.image_size)
    pixels = [read_image(s.image) for s in tqdm(images, desc="loading images", unit="img", disable=not progress)]
    key = digest([str(s.image) for s in images], label_matrix(images), config.image_size, str(init_backbone))
    checkpoint = work_dir / f"backbone-{key}.ckpt"
    trained = train_backbone(
        pixels, label_matrix(images), preprocessing, config.backbone,
        backbone=start, device=device, checkpoint=checkpoint, progress=progress,
    )
    return trained.backbone, preprocessing
