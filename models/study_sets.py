"""Study-level data as the node sees it: samples grouped into studies, study vectors built by
``models.study.study_vector`` (the node's own function), the held-out split and its fingerprint.

Used by ``mmdl-node calibrate`` (fit on a validation split of the training patients) and by the
study-level mode of ``mmdl-node evaluate`` (held-out patients).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from models.bundle import MMDLModel
from models.calibration import Calibration, fit_calibration
from models.datasets import split_by_patient
from models.errors import ModelError
from models.observations import Sample
from models.study import study_vector
from models.train import FeatureCache, HeadConfig, TrainConfig, label_matrix, labelled_images, labelled_reports, train_heads, training_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudySet:
    """Studies with at least one labelled image: vectors (n, 512), label scores (n, 14), labels, patients."""

    vectors: np.ndarray
    label_scores: np.ndarray
    labels: np.ndarray
    patients: list[str]


def held_out_digest(test: Sequence[Sample]) -> str:
    """SHA-256 of the sorted, newline-joined patient ids of a held-out split (the split's fingerprint)."""
    return hashlib.sha256("\n".join(sorted({s.patient_id for s in test})).encode()).hexdigest()


def held_out_split(samples: Sequence[Sample], model: MMDLModel) -> tuple[list[Sample], list[Sample]]:
    """(train, test) as the model was trained; ModelError when the model records no split or another one.

    The model's ``training.test_patients_sha256`` must match the test patients found here: a manifest
    that splits differently (other samples, other ids) would put training patients among the queries.
    """
    record = model.training
    if not record.get("test_fraction"):
        raise ModelError("the model records no held-out split (training.test_fraction)")
    train, test = training_split(samples, float(record["test_fraction"]), int(record.get("split_seed", 0)))
    check_split(model, test)
    return train, test


def check_split(model: MMDLModel, test: Sequence[Sample]) -> None:
    """ModelError when ``test`` is not the held-out split the model records (``test_patients_sha256``)."""
    expected, found = model.training.get("test_patients_sha256"), held_out_digest(test)
    if expected is None:
        log.warning("model %s records no test_patients_sha256; the split cannot be checked", model.version)
    elif expected != found:
        raise ModelError(
            f"this manifest's held-out patients differ from those model {model.version} was trained without "
            f"(test_patients_sha256 {found[:12]}... != {expected[:12]}...): use the manifest and split the model "
            f"was trained with"
        )


def group_studies(samples: Sequence[Sample]) -> list[list[Sample]]:
    """The studies (source, study_id) among ``samples`` that have at least one labelled image."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.source, s.study_id), []).append(s)
    studies = [g for g in groups.values() if any(s.image is not None and s.labels is not None for s in g)]
    if not studies:
        raise ModelError("no labelled image study in these samples")
    return studies


def study_set(
    samples: Sequence[Sample], model: MMDLModel, cache: FeatureCache, mode: str = "mmdl", progress: bool = False
) -> StudySet:
    """The labelled image studies among ``samples`` embedded as the node embeds them.

    Each study's image embeddings and its report's embedding (the first non-empty report of the
    study) go through ``study_vector``; its labels are the union of its samples' labels. ``mode``:
    "mmdl" (images + report through the heads), "image" (images through the heads, report left
    out), "backbone" (the backbone's image features, no heads: Image-D121; label scores are 0).
    """
    if mode not in ("mmdl", "image", "backbone"):
        raise ModelError(f"study mode must be mmdl, image or backbone, got {mode!r}")
    studies = group_studies(samples)
    images = [s for g in studies for s in g if s.image is not None]
    features = cache.features(model.backbone, [s.image for s in images], model.preprocessing, model.scda,
                              model.device, progress)
    image_h = features if mode == "backbone" else model.embed_features(features, "image")
    by_sample = dict(zip((id(s) for s in images), image_h))
    texts = [next((s.report for s in g if s.report and s.report.strip()), None) if mode == "mmdl" else None
             for g in studies]
    with_text = [t for t in texts if t is not None]
    report_h = iter(model.embed_reports(with_text) if with_text else ())
    vectors = [study_vector([by_sample[id(s)] for s in g if s.image is not None],
                            next(report_h) if text is not None else None)
               for g, text in zip(studies, texts)]
    matrix = np.stack(vectors).astype(np.float32)
    labels = np.array([np.max([s.labels for s in g if s.labels is not None], axis=0) for g in studies], np.int8)
    scores = np.zeros(labels.shape, np.float32) if mode == "backbone" else model.predict_labels(matrix)
    return StudySet(matrix, scores, labels, [g[0].patient_id for g in studies])


def describe_set(studies: StudySet) -> dict[str, Any]:
    """Counts of a study set, for records and tables (no patient data)."""
    return {"studies": len(studies.patients), "patients": len(set(studies.patients))}


def head_config(model: MMDLModel, seed: int | None = None) -> HeadConfig:
    """The model's own head configuration (defaults for a model without a training record), ``seed`` if given."""
    record = model.training.get("config")
    heads = TrainConfig.from_dict(record).heads if record else HeadConfig()
    return heads if seed is None else replace(heads, seed=seed)


def with_heads(model: MMDLModel, heads: Any) -> MMDLModel:
    """``model`` with other heads + P (same backbone, report encoder and version)."""
    return MMDLModel(model.backbone, heads, model.report_encoder, model.preprocessing, scda=model.scda,
                     version=model.version, training=model.training, device=model.device)


def retrain_heads(model: MMDLModel, samples: Sequence[Sample], cache: FeatureCache, seed: int | None = None,
                  reports: bool = True, progress: bool = False, config: HeadConfig | None = None) -> MMDLModel:
    """``model`` with heads retrained on ``samples`` (images only when not ``reports``).

    By the model's own recipe with ``seed``, or by ``config`` when given.
    """
    images, texts = labelled_images(samples), labelled_reports(samples) if reports else []
    image_x = cache.features(model.backbone, [s.image for s in images], model.preprocessing, model.scda,
                             model.device, progress)
    report_x = model.report_encoder.encode([s.report or "" for s in texts]) if texts else \
        np.zeros((0, model.report_encoder.dim), np.float32)
    heads, _ = train_heads(image_x, label_matrix(images), report_x, label_matrix(texts),
                           config or head_config(model, seed), model.device, progress=progress)
    return with_heads(model, heads)


def calibrate_model(samples: Sequence[Sample], model: MMDLModel, cache: FeatureCache,
                    validation_fraction: float = 0.2, validation_seed: int = 1, progress: bool = False) -> Calibration:
    """Fit the calibration of ``model`` on a validation split of its TRAINING patients.

    Heads are retrained by the model's recipe on the other training patients, so the validation
    studies are unseen by the heads that score them (the backbone did see them: it is not retrained);
    the held-out test patients are not touched.
    """
    train, _ = held_out_split(samples, model)
    if not 0.0 < validation_fraction < 1.0:
        raise ModelError(f"validation fraction must be in (0, 1), got {validation_fraction}")
    fit_part, validation = split_by_patient(train, [1.0 - validation_fraction, validation_fraction], validation_seed)
    fitted = retrain_heads(model, fit_part, cache, progress=progress)
    studies = study_set(validation, fitted, cache, progress=progress)
    record = {"validation_fraction": validation_fraction, "validation_seed": validation_seed,
              **describe_set(studies)}
    return fit_calibration(model.version, studies.label_scores, studies.labels, studies.vectors, studies.patients,
                           record)
