"""Retrieval evaluation of MMDL against the paper's baselines, on a held-out patient split.

Every labelled test image queries all the other test images (the MMDL paper's metrics, ``models.metrics``).
Methods, side by side:

- ``Random``: random embeddings and label scores (the floor);
- ``Image-D121``: the model's fine-tuned backbone, average-pooled features of the whole image, cosine;
- ``Image-MMDL``: MMDL heads + P trained on the training split's images only (no reports);
- ``MMDL``: the model as given (images and reports);
- ``MMDL (p% reports)``: heads retrained with only p% of the training reports (the coverage experiment).

Heads trained here use the model's own head configuration and its backbone's cached features, so
each costs seconds. The split must be the one the model was trained with (``--test-fraction`` and
``--split-seed`` of ``mmdl-node train``); a different split is reported as a warning, because the
backbone may then have seen test patients.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from models.bundle import MMDLModel
from models.errors import ModelError
from models.metrics import DEFAULT_KS, retrieval_report
from models.observations import OBSERVATIONS, Sample
from models.study_sets import StudySet, check_split, held_out_split, head_config, retrain_heads, study_set, with_heads
from models.train import (
    REPORT_FRACTIONS,
    FeatureCache,
    label_matrix,
    labelled_images,
    labelled_reports,
    report_kept,
    train_heads,
    training_split,
)

log = logging.getLogger(__name__)

MAIN_METHODS = ("Random", "Image-D121", "Image-MMDL", "MMDL")
SUMMARY_KEYS = ("map@1", "map@5", "map@10", "map@20", "map@all", "acc@1", "acc@5")


def coverage_name(fraction: float) -> str:
    """Method name of a coverage run, e.g. ``MMDL (25% reports)``."""
    return f"MMDL ({round(fraction * 100)}% reports)"


def evaluate(
    samples: Sequence[Sample],
    model: MMDLModel,
    out_dir: Path,
    test_fraction: float,
    split_seed: int = 0,
    cache_dir: Path | None = None,
    coverage: Sequence[float] = REPORT_FRACTIONS,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every method, write metrics.json, metrics.md and the plots to ``out_dir``; return the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_split(model, test_fraction, split_seed)
    train, test = training_split(samples, test_fraction, split_seed)
    check_split(model, test)
    queries = labelled_images(test)
    if len(queries) < 2:
        raise ModelError(f"the test split has {len(queries)} labelled images; retrieval needs at least 2")
    cache = FeatureCache(cache_dir or out_dir / "cache")
    device = model.device

    def features(items: Sequence[Sample], scda: bool) -> np.ndarray:
        return cache.features(model.backbone, [s.image for s in items], model.preprocessing, scda, device, progress)

    y_test = label_matrix(queries)
    test_x = features(queries, model.scda)
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, Any]] = {
        "Random": retrieval_report(
            rng.standard_normal((len(queries), model.embedding_dim)), y_test, rng.random(y_test.shape)
        ),
        "Image-D121": retrieval_report(features(queries, scda=False), y_test),
    }
    images, reports = labelled_images(train), labelled_reports(train)
    train_x, train_y = features(images, model.scda), label_matrix(images)
    report_x, report_y = model.report_encoder.encode([s.report or "" for s in reports]), label_matrix(reports)
    config = head_config(model, seed)

    def retrained(x_rep: np.ndarray, y_rep: np.ndarray) -> dict[str, Any]:
        heads, _ = train_heads(train_x, train_y, x_rep, y_rep, config, device, progress=progress)
        fitted = with_heads(model, heads)
        h = fitted.embed_features(test_x, "image")
        return retrieval_report(h, y_test, fitted.predict_labels(h))

    results["Image-MMDL"] = retrained(report_x[:0], report_y[:0])
    mmdl_h = model.embed_features(test_x, "image")
    results["MMDL"] = retrieval_report(mmdl_h, y_test, model.predict_labels(mmdl_h))
    for fraction in coverage:
        keep = np.array([report_kept(s, fraction, config.seed) for s in reports], dtype=bool)
        results[coverage_name(fraction)] = retrained(report_x[keep], report_y[keep])
    for name, values in results.items():
        values["queries"] = len(queries)
    write_outputs(results, out_dir, coverage, details=_details(model, train, queries, images, reports))
    return results


def _check_split(model: MMDLModel, test_fraction: float, split_seed: int) -> None:
    """Warn when the evaluation split is not the held-out split the model was trained without."""
    trained = (model.training.get("test_fraction"), model.training.get("split_seed"))
    if trained != (test_fraction, split_seed):
        log.warning(
            "model %s was trained with test_fraction/split_seed %s, evaluating with %s: its backbone may have "
            "seen test patients",
            model.version, trained, (test_fraction, split_seed),
        )


def _details(
    model: MMDLModel,
    train: Sequence[Sample],
    queries: Sequence[Sample],
    images: Sequence[Sample],
    reports: Sequence[Sample],
) -> dict[str, Any]:
    """Counts and identity of the run, for the Markdown header (no patient data)."""
    return {
        "model": model.version,
        "test_queries": len(queries),
        "test_patients": len({s.patient_id for s in queries}),
        "train_samples": len(train),
        "train_labelled_images": len(images),
        "train_labelled_reports": len(reports),
    }


def _fmt(value: float | None) -> str:
    """Three decimals, or a dash for a value that does not apply."""
    return "-" if value is None else f"{value:.3f}"


def markdown_table(results: dict[str, dict[str, Any]], details: dict[str, Any]) -> str:
    """The evaluation as Markdown: summary table, AP@10 per class, and the details of the run."""
    lines = ["# MMDL retrieval evaluation", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in details.items()]
    lines += ["", "| method | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(values.get(k)) for k in SUMMARY_KEYS) + " |")
    methods = [m for m in results if m in MAIN_METHODS]
    lines += ["", "AP@10 per class (mean over the test queries that have the class; - when none has it)", ""]
    lines += ["| class | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for name in OBSERVATIONS:
        lines.append(f"| {name} | " + " | ".join(_fmt(results[m]["ap@10_per_class"][name]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(
    results: dict[str, dict[str, Any]], out_dir: Path, coverage: Sequence[float], details: dict[str, Any]
) -> None:
    """metrics.json, metrics.md, map_at_k.png, ap10_per_class.png and (with coverage runs) coverage.png."""
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(markdown_table(results, details))
    methods = [m for m in MAIN_METHODS if m in results]
    names = [f"map@{'all' if k is None else k}" for k in DEFAULT_KS]

    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for method in methods:
        axis.plot(range(len(names)), [results[method][n] for n in names], marker="o", label=method)
    axis.set_xticks(range(len(names)), [n.split("@")[1] for n in names])
    axis.set(xlabel="k", ylabel="mAP@k", ylim=(0, 1), title="Retrieval mAP@k (held-out patients)")
    axis.legend()
    _save(figure, out_dir / "map_at_k.png")

    figure = Figure(figsize=(10, 4.5))
    axis = figure.subplots()
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        per_class = results[method]["ap@10_per_class"]
        heights = [per_class[c] or 0.0 for c in OBSERVATIONS]
        axis.bar(np.arange(len(OBSERVATIONS)) + i * width, heights, width, label=method)
    axis.set_xticks(np.arange(len(OBSERVATIONS)) + 0.4 - width / 2, OBSERVATIONS, rotation=45, ha="right")
    axis.set(ylabel="AP@10", ylim=(0, 1), title="AP@10 per class (0 where no test query has the class)")
    axis.legend()
    _save(figure, out_dir / "ap10_per_class.png")

    runs = [f for f in coverage if coverage_name(f) in results]
    if runs:
        figure = Figure(figsize=(6, 4))
        axis = figure.subplots()
        scores = [results[coverage_name(f)]["map@10"] for f in runs]
        axis.plot([f * 100 for f in runs], scores, marker="o", label="MMDL, heads retrained")
        for method, colour in (("Image-D121", "grey"), ("Image-MMDL", "black")):
            axis.axhline(results[method]["map@10"], linestyle="--", color=colour, label=method)
        axis.set(xlabel="% of training reports kept", ylabel="mAP@10", title="Incomplete report coverage")
        axis.legend()
        _save(figure, out_dir / "coverage.png")


def _save(figure: Figure, path: Path) -> None:
    """Lay out and write a figure as PNG."""
    figure.tight_layout()
    figure.savefig(path, dpi=100)


STUDY_METHODS = ("Random", "Image-D121", "Image-MMDL", "MMDL", "MMDL (shipped)")


def evaluate_studies(
    samples: Sequence[Sample],
    model: MMDLModel,
    out_dir: Path,
    cache_dir: Path | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Study-level retrieval on the held-out patients, as the node serves it; writes metrics-studies.json/.md.

    Every labelled image study of a test patient queries the other test studies, its own patient's
    studies excluded. Study vectors come from ``models.study.study_vector`` (the node's function):
    Image-D121 on backbone features, Image-MMDL on image heads retrained per seed without reports,
    MMDL on heads retrained per seed by the model's recipe (images + reports), and the shipped model.
    Each method's figures are the mean and standard deviation over ``seeds``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = held_out_split(samples, model)
    cache = FeatureCache(cache_dir or out_dir / "cache")
    d121 = study_set(test, model, cache, "backbone", progress)
    groups, labels = d121.patients, d121.labels
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in STUDY_METHODS}

    def measure(method: str, studies: StudySet, scores: bool = True) -> None:
        runs[method].append(retrieval_report(studies.vectors, studies.labels,
                                             studies.label_scores if scores else None, groups=groups))

    measure("Image-D121", d121, scores=False)
    measure("MMDL (shipped)", study_set(test, model, cache, "mmdl"))
    for seed in seeds:
        started = time.monotonic()
        rng = np.random.default_rng(seed)
        runs["Random"].append(retrieval_report(rng.standard_normal(d121.vectors.shape), labels,
                                               rng.random(labels.shape), groups=groups))
        image_only = retrain_heads(model, train, cache, seed, reports=False, progress=progress)
        measure("Image-MMDL", study_set(test, image_only, cache, "image"))
        measure("MMDL", study_set(test, retrain_heads(model, train, cache, seed, progress=progress), cache, "mmdl"))
        log.info("seed %d: heads retrained and evaluated in %.0f s", seed, time.monotonic() - started)
    results = {name: summarise(values) for name, values in runs.items()}
    details = {"model": model.version, "test_studies": len(groups), "test_patients": len(set(groups)),
               "seeds": list(seeds), "candidates": "the other test studies, the query's own patient's excluded"}
    (out_dir / "metrics-studies.json").write_text(json.dumps({"details": details, "results": results}, indent=2) + "\n")
    (out_dir / "metrics-studies.md").write_text(study_markdown(results, details))
    return results


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over runs of each summary metric, and the mean AP@10 per class."""
    summary: dict[str, Any] = {"runs": len(runs)}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in runs if key in r]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    summary["ap@10_per_class"] = {
        name: (None if runs[0]["ap@10_per_class"][name] is None
               else float(np.mean([r["ap@10_per_class"][name] for r in runs])))
        for name in OBSERVATIONS
    }
    return summary


def study_markdown(results: dict[str, dict[str, Any]], details: dict[str, Any]) -> str:
    """The study-level evaluation as Markdown: mean ± standard deviation over seeds, AP@10 per class."""
    lines = ["# MMDL study-level retrieval evaluation", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in details.items()]
    lines += ["", "| method | runs | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 2) + "|"]
    for name, values in results.items():
        cells = [f"{values[k]['mean']:.3f} ± {values[k]['std']:.3f}" if k in values else "-" for k in SUMMARY_KEYS]
        lines.append(f"| {name} | {values['runs']} | " + " | ".join(cells) + " |")
    lines += ["", "AP@10 per class (mean over seeds; - when no test study has the class)", ""]
    lines += ["| class | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for name in OBSERVATIONS:
        lines.append(f"| {name} | " + " | ".join(_fmt(r["ap@10_per_class"][name]) for r in results.values()) + " |")
    return "\n".join(lines) + "\n"
