"""The model bundle the DICOM node loads: backbone + MMDL heads + P + Doc2Vec, with their metadata.

A bundle is one directory:

- ``model.json``: the manifest (format, version, label names, dimensions, image preprocessing,
  SCDA on/off, Doc2Vec inference settings, the training record with the held-out split's
  ``test_patients_sha256``, the ``calibration`` of findings and match probability
  (``models.calibration``, once ``mmdl-node calibrate`` has run), SHA-256 of every other file);
- ``weights.pt``: ``{"backbone": state dict, "heads": state dict}`` stored as float16 to keep the
  directory small, loaded back as float32 (``save`` rounds the live model the same way, so a model
  and its saved copy give identical embeddings);
- ``doc2vec.model``: the report encoder (gensim, one file);
- ``metrics.json``: the evaluation the model was shipped with (``{}`` when none).

``weights.pt`` is read with ``weights_only=True``. ``doc2vec.model`` is a gensim pickle: load
bundles you trust (the checksum in model.json guards against corruption, not against an attacker).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.backbone import DenseNetBackbone, PreparedImage, extract_features, prepare_image, prepared_features
from models.bundle_manifest import MANIFEST, read_manifest
from models.calibration import Calibration
from models.errors import ModelError
from models.imaging import Preprocessing
from models.mmdl import EMBEDDING_DIM, MMDLHeads
from models.observations import OBSERVATIONS
from models.text import ReportEncoder

log = logging.getLogger(__name__)

FORMAT = "mmdl-bundle"
FORMAT_VERSION = 1
WEIGHTS = "weights.pt"
DOC2VEC = "doc2vec.model"
METRICS = "metrics.json"
BATCH_SIZE = 16
_RANDOM_SENTENCES = (
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "Cardiomegaly with small bilateral pleural effusions and mild pulmonary edema.",
    "Right lower lobe consolidation consistent with pneumonia.",
    "Left basilar atelectasis. Endotracheal tube and central venous catheter in place.",
    "Nodular opacity in the right upper lobe; a lung lesion cannot be excluded.",
    "Healing fracture of a left posterior rib. No acute cardiopulmonary abnormality.",
)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; other values are checked and kept."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _half_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with floating tensors stored as float16 (CPU, contiguous)."""
    return {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in module.state_dict().items()
    }


def round_to_stored_precision(module: torch.nn.Module) -> None:
    """Round a module's weights to what a bundle stores (float16), so features match a saved copy."""
    _load_full(module, _half_state(module), type(module).__name__)


def _load_full(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a (possibly float16) state dict as float32; ModelError naming what does not fit."""
    try:
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ModelError(f"{what} weights do not fit the model: {exc}") from exc


class MMDLModel:
    """A trained (or random) MMDL model ready to embed images and reports into one 512-d space."""

    def __init__(
        self,
        backbone: DenseNetBackbone,
        heads: MMDLHeads,
        report_encoder: ReportEncoder,
        preprocessing: Preprocessing,
        scda: bool = True,
        version: str | None = None,
        label_names: Sequence[str] = OBSERVATIONS,
        metrics: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        device: str = "auto",
        calibration: Calibration | None = None,
    ) -> None:
        if tuple(label_names) != OBSERVATIONS:
            raise ModelError(f"label names {tuple(label_names)!r} differ from the 14 CheXpert observations")
        if heads.inputs["report"].in_features != report_encoder.dim:
            raise ModelError(
                f"report head takes {heads.inputs['report'].in_features}-d input "
                f"but Doc2Vec gives {report_encoder.dim}-d"
            )
        self.device = resolve_device(device)
        self.backbone = backbone.to(self.device).eval()
        self.heads = heads.to(self.device).eval()
        self.report_encoder = report_encoder
        self.preprocessing = preprocessing
        self.scda = scda
        self.label_names: tuple[str, ...] = tuple(label_names)
        self.metrics: dict[str, Any] = dict(metrics or {})
        #: How the model was trained (configuration, data split, timings): JSON-ready, kept in model.json.
        self.training: dict[str, Any] = dict(training or {})
        self.version = version or self._make_version()
        #: Calibrated findings and match probability (``mmdl-node calibrate``), None until fitted.
        self.calibration = calibration

    @property
    def embedding_dim(self) -> int:
        """Size of h, the common space (512)."""
        return EMBEDDING_DIM

    def _make_version(self) -> str:
        """"mmdl-YYYY.MM.DD-<hash of the weights>", so two different models never share a version."""
        digest = hashlib.sha256()
        for module in (self.backbone, self.heads):
            for key, value in module.state_dict().items():
                digest.update(key.encode())
                digest.update(value.detach().to("cpu", torch.float16).numpy().tobytes())
        return f"mmdl-{datetime.now(timezone.utc):%Y.%m.%d}-{digest.hexdigest()[:8]}"

    def image_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, 1024) backbone features of 2-D [0, 1] images (SCDA crop when enabled)."""
        return extract_features(
            self.backbone, images, self.preprocessing, scda=self.scda, device=self.device, batch_size=BATCH_SIZE
        )

    @torch.no_grad()
    def embed_features(self, inputs: np.ndarray, modality: str) -> np.ndarray:
        """h for precomputed image features (``image_features``) or report vectors ("image" / "report")."""
        if len(inputs) == 0:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        x = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=self.device)
        return self.heads.encode(x, modality).cpu().numpy().astype(np.float32)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, 512) float32 raw h of images as ``models.imaging`` returns them."""
        if len(images) == 0:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return self.embed_features(self.image_features(images), "image")

    def prepare_image(self, image: np.ndarray) -> PreparedImage:
        """The CPU work on one decoded image before the backbone; thread-safe, for a decode pool."""
        return prepare_image(image, self.preprocessing, scda=self.scda)

    def embed_prepared(self, prepared: Sequence[PreparedImage]) -> np.ndarray:
        """``embed_images`` of images made ready by ``prepare_image`` (the same numbers)."""
        if len(prepared) == 0:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        features = prepared_features(
            self.backbone, prepared, self.preprocessing, scda=self.scda, batch_size=BATCH_SIZE
        )
        return self.embed_features(features, "image")

    def embed_reports(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 512) float32 raw h of report texts (Findings + Impression)."""
        return self.embed_features(self.report_encoder.encode(list(texts)), "report")

    @torch.no_grad()
    def predict_labels(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, 14) float32 sigmoid(P^T h) for embeddings from embed_images / embed_reports."""
        h = np.asarray(embeddings, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != EMBEDDING_DIM:
            raise ModelError(f"embeddings must be (n, {EMBEDDING_DIM}), got shape {h.shape}")
        scores = self.heads.project(torch.as_tensor(h, device=self.device))
        return torch.sigmoid(scores).cpu().numpy().astype(np.float32)

    def save(self, directory: str | Path) -> None:
        """Write the bundle into ``directory`` (created if needed; its bundle files are replaced).

        The live model is rounded to the stored float16 weights first, so it and its saved copy agree.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        round_to_stored_precision(self.backbone)
        round_to_stored_precision(self.heads)
        state = {"backbone": _half_state(self.backbone), "heads": _half_state(self.heads)}
        torch.save(state, directory / WEIGHTS)
        self.report_encoder.save(directory / DOC2VEC)
        (directory / METRICS).write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "label_names": list(self.label_names),
            "embedding_dim": EMBEDDING_DIM,
            "image": {
                "in_channels": self.backbone.in_channels,
                "feature_dim": self.heads.inputs["image"].in_features,
                "preprocessing": self.preprocessing.to_dict(),
                "scda": self.scda,
            },
            "report": {
                "dim": self.report_encoder.dim,
                "infer_epochs": self.report_encoder.infer_epochs,
                "seed": self.report_encoder.seed,
            },
            "weights_dtype": "float16",
            "training": self.training,
            **({"calibration": self.calibration.to_dict()} if self.calibration else {}),
            "files": {name: _sha256(directory / name) for name in (WEIGHTS, DOC2VEC, METRICS)},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log.info("saved model %s to %s", self.version, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> "MMDLModel":
        """Read a bundle written by ``save``; ModelError saying what is missing or corrupt."""
        directory = Path(directory)
        manifest = _read_manifest(directory)
        try:
            image, report = manifest["image"], manifest["report"]
            preprocessing = Preprocessing.from_dict(image["preprocessing"])
            backbone = DenseNetBackbone(int(image["in_channels"]))
            heads = MMDLHeads(image_dim=int(image["feature_dim"]), report_dim=int(report["dim"]))
            scda, infer_epochs, seed = bool(image["scda"]), int(report["infer_epochs"]), int(report["seed"])
            version, label_names = str(manifest["version"]), manifest["label_names"]
            training = dict(manifest.get("training") or {})
            calibration = Calibration.from_dict(manifest["calibration"]) if "calibration" in manifest else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{directory / MANIFEST} is incomplete or malformed: {exc!r}") from exc
        try:
            state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
            _load_full(backbone, state["backbone"], "backbone")
            _load_full(heads, state["heads"], "heads")
        except ModelError:
            raise
        except Exception as exc:  # torch raises many types for a truncated / foreign file
            raise ModelError(f"cannot read weights {directory / WEIGHTS}: {exc!r}") from exc
        report_encoder = ReportEncoder.load(directory / DOC2VEC, infer_epochs=infer_epochs, seed=seed)
        try:
            metrics = json.loads((directory / METRICS).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read {directory / METRICS}: {exc}") from exc
        return cls(
            backbone, heads, report_encoder, preprocessing, scda=scda, version=version,
            label_names=label_names, metrics=metrics, training=training, device=device, calibration=calibration,
        )


def update_manifest(directory: str | Path, calibration: Calibration, training: dict[str, Any]) -> None:
    """Store a calibration and training-record entries in a bundle's model.json, leaving its other files alone."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    manifest["training"] = {**manifest.get("training", {}), **training}
    manifest["calibration"] = calibration.to_dict()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("stored the calibration of %s in %s", manifest["version"], directory / MANIFEST)


def _read_manifest(directory: Path) -> dict[str, Any]:
    """model.json, checked for format and for every listed file's checksum."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ModelError(f"model directory not found: {directory}")
    if not path.is_file():
        raise ModelError(f"{directory} is not an MMDL model directory: {MANIFEST} is missing")
    manifest = read_manifest(directory)
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version")
        raise ModelError(f"{path} has format_version {found!r}; this code reads {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {WEIGHTS, DOC2VEC, METRICS}:
        raise ModelError(f"{path} must list checksums for {WEIGHTS}, {DOC2VEC} and {METRICS}")
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise ModelError(f"model file missing: {file}")
        if _sha256(file) != expected:
            raise ModelError(f"model file corrupt (checksum mismatch): {file}")
    return manifest


def create_random_model(directory: str | Path, seed: int = 0, device: str = "auto", image_size: int = 224) -> MMDLModel:
    """A model with the real architecture and random weights, saved to ``directory`` and loaded back.

    For tests of the node: Doc2Vec is trained on a few built-in sentences. Takes a few seconds on CPU.
    A small ``image_size`` (e.g. 64) keeps the same layers but makes each image ~12x cheaper to embed.
    """
    torch.manual_seed(seed)
    backbone = DenseNetBackbone(in_channels=3)
    heads = MMDLHeads()
    encoder = ReportEncoder.train(_RANDOM_SENTENCES * 3, min_count=1, epochs=5, seed=seed, infer_epochs=10)
    model = MMDLModel(backbone, heads, encoder, Preprocessing(size=image_size), scda=True, device="cpu")
    model.save(directory)
    return MMDLModel.load(directory, device=device)
