"""Retrieval metrics: hand-worked examples, a plain-Python loop, and torchmetrics where definitions coincide.

torchmetrics' ``RetrievalMAP(top_k=k)`` (installed version) divides by the number of relevant items
in the top k, as the MMDL paper does, and scores a query without relevant items 0 (``empty_target_action
="neg"``), as the MMDL paper does. It differs in two ways, handled below: it treats any item with a
score <= 0 as irrelevant (so cosine similarities are shifted to be positive before comparing), and
it breaks ties by ``topk`` rather than by index (so the random test data has no ties).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torchmetrics.retrieval import RetrievalMAP

from models.errors import ModelError
from models.metrics import (
    average_precision_at_k,
    label_accuracy,
    mean_average_precision,
    per_class_ap,
    rank_by_cosine,
    relevance,
    retrieval_report,
)

NAMES = ("A", "B", "C")


def plain_ap_at_k(rel: list[bool], k: int | None) -> float:
    """AP@k exactly as the MMDL paper words it, one rank at a time."""
    top = rel if k is None else rel[:k]
    total, hits = 0.0, 0
    for i, r in enumerate(top, start=1):
        if r:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def plain_map(emb: np.ndarray, lab: np.ndarray, k: int | None) -> float:
    """mAP@k with Python loops: cosine by hand, each item queries all the others."""
    n = len(emb)
    aps = []
    for q in range(n):
        sims = []
        for j in range(n):
            if j != q:
                dot = sum(float(a) * float(b) for a, b in zip(emb[q], emb[j]))
                norm = math.sqrt(sum(float(a) ** 2 for a in emb[q])) * math.sqrt(sum(float(b) ** 2 for b in emb[j]))
                sims.append((-dot / norm, j))
        ranked = [j for _, j in sorted(sims)]
        query_labels = {c for c in range(lab.shape[1]) if lab[q, c]}
        rel = [bool(query_labels & {c for c in range(lab.shape[1]) if lab[j, c]}) for j in ranked]
        aps.append(plain_ap_at_k(rel, k))
    return sum(aps) / n


@pytest.fixture
def random_set() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(60, 8))
    lab = (rng.random((60, 5)) < 0.3).astype(int)
    lab[:3] = 0  # queries with no positive label at all: AP 0 by definition
    return emb, lab


@pytest.mark.parametrize(
    "rel, k, expected",
    [
        ([1, 0, 1, 0, 0], 1, 1.0),
        ([1, 0, 1, 0, 0], 2, 1.0),
        ([1, 0, 1, 0, 0], 5, (1 / 1 + 2 / 3) / 2),
        ([0, 1, 1], None, (1 / 2 + 2 / 3) / 2),
        ([0, 1, 1], 1, 0.0),
        ([0, 0, 0], None, 0.0),
        ([0, 0, 1, 1], 3, 1 / 3),
    ],
)
def test_average_precision_hand_worked(rel: list[int], k: int | None, expected: float) -> None:
    got = average_precision_at_k(np.array([rel], dtype=bool), k)
    assert got[0] == pytest.approx(expected)
    assert plain_ap_at_k([bool(r) for r in rel], k) == pytest.approx(expected)


def test_small_retrieval_hand_worked() -> None:
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    lab = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1]])
    # rankings: q0 -> 1,2,3  q1 -> 0,2,3  q2 -> 1,0,3 (0 and 3 tie, index order)  q3 -> 2,1,0
    assert rank_by_cosine(emb).tolist() == [[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 1, 0]]
    # relevance: q0 [1,0,0] q1 [1,1,0] q2 [1,0,1] q3 [1,1,0] -> APs 1, 1, (1 + 2/3)/2, 1
    ap_q2 = (1 + 2 / 3) / 2
    got = mean_average_precision(emb, lab)
    assert got["map@1"] == pytest.approx(1.0)
    assert got["map@all"] == pytest.approx((3 + ap_q2) / 4)
    per_class = per_class_ap(emb, lab, k=10, names=NAMES)
    assert per_class == pytest.approx({"A": 1.0, "B": (1 + ap_q2 + 1) / 3, "C": 1.0})


@pytest.mark.parametrize("k", [1, 5, 10, 20, None])
def test_map_matches_plain_loop(random_set: tuple[np.ndarray, np.ndarray], k: int | None) -> None:
    emb, lab = random_set
    name = "all" if k is None else str(k)
    got = mean_average_precision(emb, lab, ks=(k,))[f"map@{name}"]
    assert got == pytest.approx(plain_map(emb, lab, k), abs=1e-12)


@pytest.mark.parametrize("k", [1, 5, 10, 20, None])
def test_map_matches_torchmetrics(random_set: tuple[np.ndarray, np.ndarray], k: int | None) -> None:
    emb, lab = random_set
    n = len(emb)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    shared = (lab @ lab.T) > 0
    queries, items = np.nonzero(~np.eye(n, dtype=bool))
    metric = RetrievalMAP(top_k=k, empty_target_action="neg")
    value = metric(
        torch.tensor(sim[queries, items] + 2.0),  # > 0: torchmetrics drops items scored <= 0
        torch.tensor(shared[queries, items]),
        indexes=torch.tensor(queries),
    )
    name = "all" if k is None else str(k)
    assert mean_average_precision(emb, lab, ks=(k,))[f"map@{name}"] == pytest.approx(float(value), abs=1e-6)


def test_per_class_ap_matches_plain_loop(random_set: tuple[np.ndarray, np.ndarray]) -> None:
    emb, lab = random_set
    names = tuple("abcde")
    got = per_class_ap(emb, lab, k=10, names=names)
    ranking = rank_by_cosine(emb)
    rel = relevance(lab, ranking)
    for c, name in enumerate(names):
        queries = [q for q in range(len(emb)) if lab[q, c]]
        expected = sum(plain_ap_at_k(rel[q].tolist(), 10) for q in queries) / len(queries)
        assert got[name] == pytest.approx(expected)


def test_per_class_ap_none_without_queries() -> None:
    emb = np.eye(3)
    lab = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0]])
    assert per_class_ap(emb, lab, names=NAMES)["C"] is None


def test_rank_excludes_self_and_is_a_permutation(random_set: tuple[np.ndarray, np.ndarray]) -> None:
    emb, _ = random_set
    ranking = rank_by_cosine(emb)
    for q, row in enumerate(ranking):
        assert q not in row
        assert sorted(row.tolist()) == [j for j in range(len(emb)) if j != q]


def test_label_accuracy_hand_worked() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    lab = np.array([[0, 0, 1], [0, 1, 0]])
    assert label_accuracy(scores, lab, 1) == 0.5
    assert label_accuracy(scores, lab, 2) == 1.0


def test_retrieval_report_keys(random_set: tuple[np.ndarray, np.ndarray]) -> None:
    emb, lab = random_set
    scores = np.random.default_rng(0).random(lab.shape)
    report = retrieval_report(emb, lab, scores, names=tuple("abcde"))
    assert {"map@1", "map@5", "map@10", "map@20", "map@all", "acc@1", "acc@5", "ap@10_per_class"} <= report.keys()
    assert report["map@10"] == pytest.approx(mean_average_precision(emb, lab)["map@10"])


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ModelError, match="at least 2"):
        mean_average_precision(np.ones((1, 3)), np.ones((1, 2)))
    with pytest.raises(ModelError, match="same n"):
        mean_average_precision(np.ones((3, 3)), np.ones((2, 2)))
    with pytest.raises(ModelError, match="k must"):
        average_precision_at_k(np.ones((2, 2), dtype=bool), 0)
    with pytest.raises(ModelError, match="between 1 and 3"):
        label_accuracy(np.ones((2, 3)), np.ones((2, 3)), 4)


def test_fast_for_thousands_of_queries() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3000, 64)).astype(np.float32)
    lab = (rng.random((3000, 14)) < 0.15).astype(np.int8)
    start = time.perf_counter()
    report = retrieval_report(emb, lab)
    assert time.perf_counter() - start < 30  # about 2 s on one core; generous for a shared CI machine
    # random embeddings rank at random: mAP@all sits at the share of relevant candidates per query
    shared = (lab.astype(np.float32) @ lab.T.astype(np.float32)) > 0
    np.fill_diagonal(shared, False)
    assert report["map@all"] == pytest.approx(shared.sum(axis=1).mean() / 2999, abs=0.03)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    classes=st.integers(1, 4),
    seed=st.integers(0, 10_000),
)
def test_map_properties(n: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 3))
    lab = (rng.random((n, classes)) < 0.5).astype(int)
    got = mean_average_precision(emb, lab, ks=(1, n - 1, None))
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert got[f"map@{n - 1}"] == pytest.approx(got["map@all"])  # the top n-1 is everything
    assert got["map@all"] == pytest.approx(plain_map(emb, lab, None))


def test_own_group_is_no_candidate_hand_worked() -> None:
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    lab = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1]])
    groups = ["p", "p", "q", "r"]  # items 0 and 1 are one patient's
    ranking = rank_by_cosine(emb, groups)
    assert ranking.tolist() == [[2, 3, 1], [2, 3, 0], [1, 0, 3], [2, 1, 0]]
    rel = relevance(lab, ranking, groups)
    assert rel.tolist() == [[False, False, False], [True, True, False], [True, False, True], [True, True, False]]
    report = retrieval_report(emb, lab, names=NAMES, groups=groups)
    # q0 finds no relevant other-patient item; q1: 1, q2: (1 + 2/3)/2, q3: 1
    assert report["map@all"] == pytest.approx((0 + 1 + (1 + 2 / 3) / 2 + 1) / 4)
    assert report["map@1"] == pytest.approx(3 / 4)
    with pytest.raises(ModelError, match="groups"):
        retrieval_report(emb, lab, groups=groups[:3])
