"""Retrieval and label metrics as the MMDL paper defines them ("Multimodal Multitask Deep Learning for X-Ray
Image Retrieval", Yu et al., MICCAI 2021).

Public API (stable; used by the evaluation command):

- ``rank_by_cosine(embeddings, groups=None) -> (n, n-1) int64``: for each item, the other items
  ordered by descending cosine similarity (the item itself excluded; ties keep index order); items
  of the query's own group (``groups[q]``, e.g. its patient) are ranked after all others.
- ``relevance(labels, ranking, groups=None) -> (n, n-1) bool``: ``rel[q, i]`` is True when the i-th
  retrieved item shares at least one positive label with query q and is not of q's group: with
  groups, the query's own patient's items are no candidates (they count as not retrieved).
- ``average_precision_at_k(rel, k) -> (n,) float64``: AP@k per query; ``k=None`` means all.
  AP@k = sum_{i<=k} P@i * rel(i) / (number of relevant items in the top k), 0 when there is none.
- ``mean_average_precision(embeddings, labels, ks=(1, 5, 10, 20, None)) -> {"map@1": ..., "map@all": ...}``
- ``per_class_ap(embeddings, labels, k=10, names=OBSERVATIONS) -> {name: float | None}``: mean
  AP@k over the queries that have that class positive (None when no query has it).
- ``label_accuracy(scores, labels, k) -> float``: Acc-k, the fraction of samples for which any of
  the k highest predicted label scores is a true label.
- ``retrieval_report(embeddings, labels, scores=None, groups=None) -> dict``: all of the above under the
  keys ``map@1 map@5 map@10 map@20 map@all acc@1 acc@5`` plus ``ap@10_per_class`` (a dict).

Every query is kept in the means, including a query without any positive label (its AP is 0,
as the definition says). ``labels`` are binary (n, 14) arrays after the uncertainty policy.
Work is chunked over queries so a few thousand queries stay fast and small in memory.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.errors import ModelError
from models.observations import OBSERVATIONS

DEFAULT_KS: tuple[int | None, ...] = (1, 5, 10, 20, None)
_CHUNK = 512


def _k_name(k: int | None) -> str:
    """``map@10`` style key for a cut-off; None is ``all``."""
    return "all" if k is None else str(k)


def _check_pair(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes where values enter: (n, d) embeddings and (n, c) binary labels, n >= 2."""
    emb = np.asarray(embeddings, dtype=np.float64)
    lab = np.asarray(labels)
    if emb.ndim != 2 or lab.ndim != 2 or emb.shape[0] != lab.shape[0]:
        raise ModelError(f"embeddings {emb.shape} and labels {lab.shape} must be (n, d) and (n, c) with the same n")
    if emb.shape[0] < 2:
        raise ModelError(f"retrieval needs at least 2 items, got {emb.shape[0]}")
    return emb, lab.astype(bool)


def rank_by_cosine(embeddings: np.ndarray, groups: Sequence[str] | None = None) -> np.ndarray:
    """Indices of the other items for each query, most cosine-similar first (self excluded, own group last)."""
    emb = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.where(norms > 0, norms, 1.0)
    n = unit.shape[0]
    ranking = np.empty((n, n - 1), dtype=np.int64)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        sim = unit[start:stop] @ unit.T
        if groups is not None:
            sim[_same_group(groups, start, stop)] = -3.0  # below any cosine, above the query itself
        rows = np.arange(stop - start)
        sim[rows, start + rows] = -np.inf  # the query itself sorts last, then is cut off
        order = np.argsort(-sim, axis=1, kind="stable")
        ranking[start:stop] = order[:, : n - 1]
    return ranking


def _same_group(groups: Sequence[str], start: int, stop: int) -> np.ndarray:
    """(stop - start, n) bool: item j is of the same group as query start + i."""
    g = np.asarray(groups)
    return g[start:stop, None] == g[None, :]


def relevance(labels: np.ndarray, ranking: np.ndarray, groups: Sequence[str] | None = None) -> np.ndarray:
    """rel[q, i]: the i-th item retrieved for q shares a positive label with q (and is not of q's group)."""
    lab = np.asarray(labels).astype(bool)
    if lab.shape[0] != ranking.shape[0]:
        raise ModelError(f"labels for {lab.shape[0]} items but a ranking for {ranking.shape[0]} queries")
    lab_f = lab.astype(np.float32)
    rel = np.empty(ranking.shape, dtype=bool)
    for start in range(0, ranking.shape[0], _CHUNK):
        stop = min(start + _CHUNK, ranking.shape[0])
        shared = lab_f[start:stop] @ lab_f.T  # (chunk, n): number of positive labels in common
        if groups is not None:
            shared[_same_group(groups, start, stop)] = 0
        rel[start:stop] = np.take_along_axis(shared, ranking[start:stop], axis=1) > 0
    return rel


def average_precision_at_k(rel: np.ndarray, k: int | None) -> np.ndarray:
    """AP@k per query from a (queries, ranked items) boolean relevance matrix."""
    if k is not None and k < 1:
        raise ModelError(f"k must be a positive integer or None, got {k!r}")
    top = np.asarray(rel, dtype=bool)[:, : rel.shape[1] if k is None else k]
    hits = np.cumsum(top, axis=1, dtype=np.float64)
    precision = hits / np.arange(1, top.shape[1] + 1)
    numerator = (precision * top).sum(axis=1)
    found = hits[:, -1] if top.shape[1] else np.zeros(top.shape[0])
    return np.divide(numerator, found, out=np.zeros_like(numerator), where=found > 0)


def _ap_table(
    embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int | None], groups: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """AP@k of every query for each k, from one cosine ranking (own group excluded when given)."""
    emb, lab = _check_pair(embeddings, labels)
    if groups is not None and len(groups) != len(emb):
        raise ModelError(f"{len(groups)} groups for {len(emb)} items")
    rel = relevance(lab, rank_by_cosine(emb, groups), groups)
    return {_k_name(k): average_precision_at_k(rel, k) for k in ks}


def mean_average_precision(
    embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int | None] = DEFAULT_KS
) -> dict[str, float]:
    """mAP@k over all queries, each querying all the other items: {"map@1": ..., "map@all": ...}."""
    return {f"map@{name}": float(ap.mean()) for name, ap in _ap_table(embeddings, labels, ks).items()}


def _per_class_mean(ap: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    """Mean of per-query AP over the queries having each class (None when none has it)."""
    lab = np.asarray(labels).astype(bool)
    if lab.shape[1] != len(names):
        raise ModelError(f"labels have {lab.shape[1]} classes but {len(names)} names were given")
    return {name: (float(ap[lab[:, c]].mean()) if lab[:, c].any() else None) for c, name in enumerate(names)}


def per_class_ap(
    embeddings: np.ndarray, labels: np.ndarray, k: int = 10, names: Sequence[str] = OBSERVATIONS
) -> dict[str, float | None]:
    """AP@k per class: the mean AP@k over the queries that have that class positive."""
    ap = _ap_table(embeddings, labels, (k,))[str(k)]
    return _per_class_mean(ap, labels, names)


def label_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Acc-k: share of samples where one of the k top-scored labels is a true (positive) label."""
    sc = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels).astype(bool)
    if sc.shape != lab.shape or sc.ndim != 2:
        raise ModelError(f"scores {sc.shape} and labels {lab.shape} must both be (n, c)")
    if not 1 <= k <= sc.shape[1]:
        raise ModelError(f"k must be between 1 and {sc.shape[1]}, got {k}")
    top = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    return float(np.take_along_axis(lab, top, axis=1).any(axis=1).mean())


def retrieval_report(
    embeddings: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None = None,
    names: Sequence[str] = OBSERVATIONS,
    groups: Sequence[str] | None = None,
) -> dict[str, float | dict[str, float | None]]:
    """All of the paper's metrics for one method: mAP@{1,5,10,20,all}, AP@10 per class, Acc-1/5.

    With ``groups`` (each item's patient), a query's own patient's items are no candidates.
    """
    table = _ap_table(embeddings, labels, DEFAULT_KS, groups)
    report: dict[str, float | dict[str, float | None]] = {f"map@{n}": float(ap.mean()) for n, ap in table.items()}
    report["ap@10_per_class"] = _per_class_mean(table["10"], labels, names)
    if scores is not None:
        report["acc@1"] = label_accuracy(scores, labels, 1)
        report["acc@5"] = label_accuracy(scores, labels, 5)
    return report
