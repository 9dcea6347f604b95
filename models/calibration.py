"""Calibrated findings and a score comparable across queries, fitted on held-out training patients.

Both live in the model's manifest (``model.json``, key ``calibration``), so the node reads them
without torch and every model carries its own:

- per finding, a Platt scaling ``p = sigmoid(slope * s + intercept)`` of the raw score
  ``s = P^T v`` of a study vector ``v`` (the node stores ``sigmoid(s)``) and a decision threshold
  on ``p`` (F1-optimal on the fitting studies); a finding with fewer than ``MIN_POSITIVES``
  positives there has no calibration and is never shown;
- the match probability of an answer: the share of study pairs (of different patients) at that
  cosine that have at least one positive finding in common, fitted by isotonic regression and kept
  as (cosine, probability) knots, read by linear interpolation.

Torch-free: ``dicom_node`` imports it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle_manifest import read_manifest
from models.errors import ModelError
from models.observations import OBSERVATIONS

CALIBRATION_FORMAT = 1
MIN_POSITIVES = 10  # positives a finding needs among the fitting studies to be calibrated (and shown)
MAX_SHOWN = 3
NO_FINDING = OBSERVATIONS.index("No Finding")
_DISEASES = [i for i in range(len(OBSERVATIONS)) if i != NO_FINDING]
SIMILARITY_BINS = 40


@dataclass(frozen=True)
class FindingCalibration:
    """One finding's Platt scaling and threshold; ``slope`` None when it had too few positives."""

    name: str
    positives: int
    slope: float | None = None
    intercept: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class Calibration:
    """What the node needs to turn stored label scores and cosines into what a reader sees."""

    model_version: str
    findings: tuple[FindingCalibration, ...]
    similarity: tuple[tuple[float, float], ...]  # (cosine, match probability) knots, cosine ascending
    fitted_on: dict[str, Any]

    @cached_property
    def _platt(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each finding's slope, intercept (NaN where uncalibrated) and threshold (inf there), as arrays built once:
        the node asks for the findings of every answer of every query."""
        return (np.array([np.nan if f.slope is None else f.slope for f in self.findings]),
                np.array([np.nan if f.intercept is None else f.intercept for f in self.findings]),
                np.array([np.inf if f.threshold is None else f.threshold for f in self.findings]))

    @cached_property
    def _knots(self) -> np.ndarray:
        """The similarity knots as two arrays, cosines and probabilities (built once)."""
        return np.array(self.similarity).T

    def probabilities(self, label_scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of stored ``sigmoid(P^T v)`` scores ((14,) or (n, 14)); NaN where uncalibrated."""
        stored = np.clip(np.asarray(label_scores, dtype=np.float64), 1e-7, 1 - 1e-7)
        raw = np.log(stored / (1 - stored))
        slope, intercept, _ = self._platt
        return 1.0 / (1.0 + np.exp(-(slope * raw + intercept)))

    def positive(self, label_scores: np.ndarray) -> np.ndarray:
        """Boolean (n, 14) or (14,): calibrated probability at or above the finding's threshold.

        "No Finding" counts as positive only when no other finding is.
        """
        return self._positive(self.probabilities(label_scores))

    def _positive(self, p: np.ndarray) -> np.ndarray:
        """``positive`` of the calibrated probabilities ``p`` (NaN, uncalibrated, compares False)."""
        positive = p >= self._platt[2]
        disease = positive[..., _DISEASES].any(axis=-1)
        positive[..., NO_FINDING] &= ~disease
        return positive

    def shown_findings(self, label_scores: np.ndarray) -> list[tuple[str, float]]:
        """The findings a reader sees for one study: at most MAX_SHOWN, most probable first, with p."""
        p = self.probabilities(label_scores)
        shown = np.flatnonzero(self._positive(p))
        order = shown[np.argsort(-p[shown], kind="stable")]
        return [(OBSERVATIONS[i], float(p[i])) for i in order[:MAX_SHOWN]]

    def match_probability(self, cosine: float | np.ndarray) -> float | np.ndarray:
        """Probability that an answer at this cosine shares a finding with the query (isotonic fit)."""
        x, y = self._knots
        value = np.interp(cosine, x, y)
        return float(value) if np.ndim(value) == 0 else value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored under ``calibration`` in model.json."""
        return {
            "format": CALIBRATION_FORMAT,
            "model_version": self.model_version,
            "findings": [asdict(f) for f in self.findings],
            "similarity": [list(k) for k in self.similarity],
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Calibration":
        """Inverse of to_dict; ModelError for a record of another format or that does not fit."""
        if not isinstance(values, dict) or values.get("format") != CALIBRATION_FORMAT:
            raise ModelError(f"calibration record of format {values.get('format') if isinstance(values, dict) else None!r};"
                             f" this code reads {CALIBRATION_FORMAT}")
        try:
            findings = tuple(FindingCalibration(**f) for f in values["findings"])
            similarity = tuple((float(c), float(p)) for c, p in values["similarity"])
            calibration = cls(str(values["model_version"]), findings, similarity, dict(values.get("fitted_on") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed calibration record: {exc!r}") from exc
        if tuple(f.name for f in findings) != OBSERVATIONS or len(similarity) < 2:
            raise ModelError("calibration record must list the 14 observations in order and >= 2 similarity knots")
        return calibration


def load_calibration(model_dir: str | Path) -> Calibration | None:
    """The calibration stored in a model directory's model.json, or None when it has none."""
    record = read_manifest(model_dir).get("calibration")
    return None if record is None else Calibration.from_dict(record)


# ---------------------------------------------------------------- fitting


def fit_platt(raw: np.ndarray, y: np.ndarray, iterations: int = 50, ridge: float = 1e-3) -> tuple[float, float]:
    """(slope, intercept) of a logistic regression of ``y`` on one score, by Newton's method.

    Targets are Platt's smoothed ones ((n+ + 1)/(n+ + 2), 1/(n- + 2)), which keeps the fit finite on
    separable data; a small ridge on the slope keeps the Hessian invertible.
    """
    raw, y = np.asarray(raw, dtype=np.float64), np.asarray(y, dtype=np.float64)
    positives, negatives = y.sum(), len(y) - y.sum()
    target = np.where(y > 0, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    x = np.stack([raw, np.ones_like(raw)], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (p - target) + ridge * np.array([w[0], 0.0])
        hessian = (x * (p * (1 - p))[:, None]).T @ x + ridge * np.diag([1.0, 1e-9])
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def f1_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The probability cut with the best F1 on (p, y) (ties: the higher cut, i.e. the more precise)."""
    order = np.argsort(-p, kind="stable")
    hits = np.cumsum(y[order])
    shown = np.arange(1, len(p) + 1)
    f1 = 2 * hits / (shown + y.sum())
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # last maximum in descending-p order = highest cut
    return float(p[order][best])


def isotonic(x: np.ndarray, y: np.ndarray, bins: int = SIMILARITY_BINS) -> tuple[tuple[float, float], ...]:
    """Monotone non-decreasing fit of y on x: quantile bins of x, pooled adjacent violators over their means.

    Returns (median x of the bin, fitted y) knots.
    """
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x)[order], np.asarray(y, dtype=np.float64)[order]
    chunks = [c for c in np.array_split(np.arange(len(x)), min(bins, len(x))) if len(c)]
    blocks = [[float(y[c].mean()), len(c), [float(np.median(x[c]))]] for c in chunks]
    merged: list[list[Any]] = []
    for block in blocks:
        merged.append(block)
        while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
            (m2, n2, x2), (m1, n1, x1) = merged.pop(), merged.pop()
            merged.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2, x1 + x2])
    return tuple((cx, round(m, 6)) for m, _, xs in merged for cx in xs)


def fit_calibration(
    model_version: str,
    label_scores: np.ndarray,
    labels: np.ndarray,
    vectors: np.ndarray,
    patients: Sequence[str],
    fitted_on: dict[str, Any],
) -> Calibration:
    """Fit findings and match probability on studies unseen by the heads that scored them.

    ``label_scores``: stored-form scores sigmoid(P^T v) (n, 14); ``labels``: (n, 14) 0/1;
    ``vectors``: the study vectors (n, d); ``patients``: each study's patient (pairs of one patient
    are left out of the similarity fit).
    """
    stored = np.clip(np.asarray(label_scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    raw = np.log(stored / (1 - stored))
    labels = np.asarray(labels) > 0
    findings = []
    for i, name in enumerate(OBSERVATIONS):
        positives = int(labels[:, i].sum())
        if positives < MIN_POSITIVES or positives == len(labels):
            findings.append(FindingCalibration(name, positives))
            continue
        slope, intercept = fit_platt(raw[:, i], labels[:, i])
        p = 1.0 / (1.0 + np.exp(-(slope * raw[:, i] + intercept)))
        findings.append(FindingCalibration(name, positives, round(slope, 6), round(intercept, 6),
                                           round(f1_threshold(p, labels[:, i]), 6)))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    patients = np.asarray(patients)
    upper = np.triu(np.ones(cosine.shape, dtype=bool), k=1) & (patients[:, None] != patients[None, :])
    shared = (labels.astype(np.float32) @ labels.T.astype(np.float32)) > 0
    similarity = isotonic(cosine[upper], shared[upper])
    return Calibration(model_version, tuple(findings), similarity, dict(fitted_on, pairs=int(upper.sum())))


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE: the count-weighted mean |mean p - share positive| over equal-width probability bins."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(p[inside].mean() - y[inside].mean())
    return total / max(len(p), 1)
