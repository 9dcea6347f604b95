"""MMDL losses against plain loops, the shared-layer layout, and a few training steps."""
from __future__ import annotations

import math

import pytest
import torch

from models.mmdl import EMBEDDING_DIM, MMDLHeads, label_loss, mmdl_loss, multilabel_triplet_loss


def _labels(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_label_loss_matches_plain_loop() -> None:
    torch.manual_seed(1)
    scores = torch.randn(5, 14)
    y = (torch.rand(5, 14) > 0.7).float()
    expected = 0.0
    for i in range(5):
        expected += math.sqrt(sum((float(scores[i, j]) - float(y[i, j])) ** 2 for j in range(14)))
    expected /= 5
    assert float(label_loss(scores, y)) == pytest.approx(expected, rel=1e-5)


def _plain_triplet(h: torch.Tensor, y: torch.Tensor, margin: float) -> float:
    n = len(h)
    hl = [[float(v) for v in row] for row in h]
    yl = [[int(v) for v in row] for row in y]

    def cos_dist(a: list[float], b: list[float]) -> float:
        dot = sum(x * z for x, z in zip(a, b))
        return 1.0 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(z * z for z in b)))

    def share(a: int, b: int) -> bool:
        return any(p and q for p, q in zip(yl[a], yl[b]))

    losses = []
    for a in range(n):
        for p in range(n):
            for q in range(n):
                if len({a, p, q}) == 3 and share(a, p) and not share(a, q):
                    losses.append(max(0.0, cos_dist(hl[a], hl[p]) - cos_dist(hl[a], hl[q]) + margin))
    return sum(losses) / len(losses) if losses else 0.0


def test_triplet_loss_matches_plain_loop() -> None:
    torch.manual_seed(2)
    h = torch.randn(7, 6)
    y = _labels(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 1, 1],
            [0, 0, 0, 0],  # no positive label: neither anchor-with-positives nor positive to anyone
            [1, 0, 0, 1],
        ]
    )
    for margin in (0.0, 0.2, 1.0):
        expected = _plain_triplet(h, y, margin)
        assert expected > 0
        assert float(multilabel_triplet_loss(h, y, margin)) == pytest.approx(expected, rel=1e-5)


def test_triplet_loss_is_zero_without_valid_triplets() -> None:
    h = torch.randn(3, 4, requires_grad=True)
    loss = multilabel_triplet_loss(h, _labels([[1, 0], [1, 0], [1, 0]]))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph


def test_layers_shared_between_modalities() -> None:
    heads = MMDLHeads(image_dim=1024, report_dim=300)
    assert heads.inputs["image"].weight.shape == (1024, 1024)
    assert heads.inputs["report"].weight.shape == (1024, 300)
    assert heads.P.shape == (EMBEDDING_DIM, 14)
    x_img, x_rep = torch.randn(2, 1024), torch.randn(2, 300)
    h_img, h_rep = heads.encode(x_img, "image"), heads.encode(x_rep, "report")
    assert h_img.shape == h_rep.shape == (2, EMBEDDING_DIM)
    assert bool((h_img >= 0).all())  # ReLU output
    (h_img.sum() + h_rep.sum()).backward()
    shared_grad = heads.shared[2].weight.grad
    assert shared_grad is not None and float(shared_grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="video"):
        heads.encode(x_img, "video")


def test_total_loss_is_sum_of_parts_and_unpaired_batches_train() -> None:
    torch.manual_seed(3)
    heads = MMDLHeads(image_dim=16, report_dim=8)
    y_img = (torch.rand(12, 14) > 0.6).float()
    y_rep = (torch.rand(10, 14) > 0.6).float()
    batch = {"image": (torch.randn(12, 16), y_img), "report": (torch.randn(10, 8), y_rep)}
    loss, parts = mmdl_loss(heads, batch, triplet_weight=0.5)
    assert float(loss.detach()) == pytest.approx(
        parts["label_image"] + parts["label_report"] + 0.5 * parts["triplet_image"], rel=1e-5
    )
    balanced, parts = mmdl_loss(heads, batch, triplet_weight=0.5, report_weight=0.3)
    assert float(balanced.detach()) == pytest.approx(
        parts["label_image"] + 0.3 * parts["label_report"] + 0.5 * parts["triplet_image"], rel=1e-5
    )
    only_reports, parts = mmdl_loss(heads, {"report": batch["report"]})
    assert set(parts) == {"label_report", "total"}
    only_reports.backward()
    assert heads.inputs["image"].weight.grad is None


def test_few_steps_lower_the_loss() -> None:
    torch.manual_seed(4)
    heads = MMDLHeads(image_dim=16, report_dim=8)
    y = (torch.rand(32, 14) > 0.7).float()
    x_img = y @ torch.randn(14, 16) + 0.1 * torch.randn(32, 16)
    x_rep = y @ torch.randn(14, 8) + 0.1 * torch.randn(32, 8)
    batch = {"image": (x_img, y), "report": (x_rep, y)}
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    first, _ = mmdl_loss(heads, batch)
    for _ in range(30):
        opt.zero_grad()
        loss, _ = mmdl_loss(heads, batch)
        loss.backward()
        opt.step()
    last, _ = mmdl_loss(heads, batch)
    assert float(last.detach()) < 0.7 * float(first.detach())


def test_input_statistics_standardise_each_modality() -> None:
    heads = MMDLHeads(image_dim=4, report_dim=3)
    x = torch.tensor([[1.0, 2, 3, 4], [3, 6, 9, 12]])
    heads.set_input_statistics("image", x)
    reference = MMDLHeads(image_dim=4, report_dim=3)
    reference.load_state_dict(heads.state_dict())
    reference.image_mean.zero_()
    reference.image_std.fill_(1.0)
    standardised = (x - x.mean(0)) / x.std(0)
    assert torch.allclose(heads.encode(x, "image"), reference.encode(standardised, "image"))
    assert "image_mean" in heads.state_dict() and "report_std" in heads.state_dict()
