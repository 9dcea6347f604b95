"""What a reader sees beside similar-case answers, before and after calibration, on held-out patients.

    .venv/bin/python scripts/measure_answers.py MANIFEST CACHE_DIR [MODEL_DIR]

Prints (Markdown) the per-class precision / recall / F1 and ECE of the shown findings on the
held-out studies, and for 20 held-out query studies (top-10 answers among the other held-out
studies): findings shown per answer, the share of answers with "No Finding" beside a disease, and
the spread of the scores. "Before" is the node as it was: study vector = plain mean of the raw
image mean and report vector, every finding with sigmoid(P^T v) >= 0.5 shown, the cosine as score.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from models.bundle import MMDLModel
from models.bundle_manifest import DEFAULT_MODEL_DIR
from models.calibration import Calibration, expected_calibration_error
from models.datasets import read_manifest
from models.observations import OBSERVATIONS
from models.study_sets import group_studies, held_out_split, study_set
from models.train import FeatureCache

NO_FINDING = OBSERVATIONS.index("No Finding")
QUERIES, TOP = 20, 10


def findings_table(calibration: Calibration, scores: np.ndarray, labels: np.ndarray) -> str:
    """Per calibrated class: positives, shown, precision, recall, F1 of the shown findings; ECE of p."""
    shown = np.zeros(labels.shape, bool)
    for row, s in enumerate(scores):
        for name, _ in calibration.shown_findings(s):
            shown[row, OBSERVATIONS.index(name)] = True
    p = calibration.probabilities(scores)
    lines = ["| finding | test positives | shown | precision | recall | F1 | ECE |", "|---|---|---|---|---|---|---|"]
    for i, name in enumerate(OBSERVATIONS):
        if calibration.findings[i].slope is None:
            continue
        y, s = labels[:, i] > 0, shown[:, i]
        tp = int((y & s).sum())
        precision = tp / s.sum() if s.sum() else float("nan")
        recall = tp / y.sum() if y.sum() else float("nan")
        f1 = 2 * tp / (s.sum() + y.sum()) if s.sum() + y.sum() else float("nan")
        lines.append(f"| {name} | {int(y.sum())} | {int(s.sum())} | {precision:.3f} | {recall:.3f} | {f1:.3f} | "
                     f"{expected_calibration_error(p[:, i], y):.3f} |")
    return "\n".join(lines)


def answers(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines) of the top answers of each query among the other studies."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit[queries] @ unit.T
    cosine[np.arange(len(queries)), queries] = -np.inf
    top = np.argsort(-cosine, axis=1, kind="stable")[:, :TOP]
    return top, np.take_along_axis(cosine, top, axis=1)


def describe(name: str, findings: list[list[str]], scores: np.ndarray) -> str:
    """One row: findings per answer (median, min-max), share with No Finding beside a disease, score spread."""
    counts = np.array([len(f) for f in findings])
    mixed = np.mean([OBSERVATIONS[NO_FINDING] in f and len(f) > 1 for f in findings])
    spread = scores.max(axis=1) - scores.min(axis=1)
    return (f"| {name} | {np.median(counts):.0f} ({counts.min()}-{counts.max()}) | {mixed:.0%} | "
            f"{scores.min():.3f}-{scores.max():.3f} | {np.median(spread):.3f} |")


def main(manifest: str, cache_dir: str, model_dir: str = str(DEFAULT_MODEL_DIR)) -> None:
    model = MMDLModel.load(model_dir, device="cpu")
    assert model.calibration is not None, "run mmdl-node calibrate first"
    samples = read_manifest(manifest)
    _, test = held_out_split(samples, model)
    cache = FeatureCache(Path(cache_dir))
    after = study_set(test, model, cache, "mmdl")
    print(f"held-out image studies: {len(after.patients)} of {len(set(after.patients))} patients\n")
    print(findings_table(model.calibration, after.label_scores, after.labels), "\n")

    # Before: the old study vector (plain mean of raw image mean and report vector), 0.5 cut, cosine.
    groups = group_studies(test)
    features = cache.features(model.backbone, [s.image for g in groups for s in g if s.image is not None],
                              model.preprocessing, model.scda, "cpu", False)
    image_h = iter(model.embed_features(features, "image"))
    old = []
    for g in groups:
        parts = [np.mean([next(image_h) for s in g if s.image is not None], axis=0)]
        text = next((s.report for s in g if s.report and s.report.strip()), None)
        if text is not None:
            parts.append(model.embed_reports([text])[0])
        old.append(np.mean(parts, axis=0))
    before_vectors = np.stack(old).astype(np.float32)
    before_scores = model.predict_labels(before_vectors)

    queries = np.random.default_rng(0).choice(len(groups), QUERIES, replace=False)
    rows = ["| | findings per answer, median (range) | No Finding beside a disease | top-10 scores, min-max "
            "| spread within a query's top 10, median |", "|---|---|---|---|---|"]
    top, cosines = answers(before_vectors, queries)
    shown = [[OBSERVATIONS[i] for i in np.argsort(-before_scores[a]) if before_scores[a, i] >= 0.5] for a in top.ravel()]
    rows.append(describe("before (cosine, p >= 0.5)", shown, cosines))
    top, cosines = answers(after.vectors, queries)
    shown = [[name for name, _ in model.calibration.shown_findings(after.label_scores[a])] for a in top.ravel()]
    rows.append(describe("after (match probability, calibrated)", shown,
                         np.asarray(model.calibration.match_probability(cosines))))
    rows.append(describe("after, cosine of the same answers", shown, cosines))
    print("\n".join(rows))


if __name__ == "__main__":
    main(*sys.argv[1:])
