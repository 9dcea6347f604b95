"""The MMDL network (Yu et al., MICCAI 2021): per-modality encoders into a 512-d common space,
the label projection P, and the two losses that train them.

Encoders: three fully connected layers of 1024, 1024 and 512 units, each followed by ReLU. The
paper shares the layers between modalities; here the inputs differ in size (image features 1024-d,
Doc2Vec report vectors 300-d), so the FIRST layer is per modality (1024->1024 for images,
300->1024 for reports) and the second (1024->1024) and third (1024->512) layers are one set of
weights that both modalities go through. P (512 x 14) is shared too, so both modalities are pulled
towards one label space and need no pairing.

Each modality's input is standardised with a per-feature mean and standard deviation measured on
the training data (``set_input_statistics``) and stored with the weights: backbone features and
Doc2Vec vectors come on very different scales.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.errors import ModelError
from models.observations import NUM_OBSERVATIONS

IMAGE_DIM = 1024
REPORT_DIM = 300
HIDDEN_DIM = 1024
EMBEDDING_DIM = 512
MODALITIES = ("image", "report")


class MMDLHeads(nn.Module):
    """Both modality encoders and P; ``encode(x, modality)`` gives h, ``project(h)`` gives P^T h."""

    def __init__(
        self,
        image_dim: int = IMAGE_DIM,
        report_dim: int = REPORT_DIM,
        num_labels: int = NUM_OBSERVATIONS,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.inputs = nn.ModuleDict(
            {"image": nn.Linear(image_dim, HIDDEN_DIM), "report": nn.Linear(report_dim, HIDDEN_DIM)}
        )
        self.shared = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(HIDDEN_DIM, HIDDEN_DIM),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(HIDDEN_DIM, EMBEDDING_DIM),
            nn.ReLU(),
        )
        self.P = nn.Parameter(torch.randn(EMBEDDING_DIM, num_labels) * (1.0 / EMBEDDING_DIM**0.5))
        for modality, dim in (("image", image_dim), ("report", report_dim)):
            self.register_buffer(f"{modality}_mean", torch.zeros(dim))
            self.register_buffer(f"{modality}_std", torch.ones(dim))

    def set_input_statistics(self, modality: str, x: torch.Tensor) -> None:
        """Store the per-feature mean and std of a modality's training inputs (no-op for < 2 rows)."""
        self._check(modality)
        if x.shape[0] < 2:
            return
        getattr(self, f"{modality}_mean").copy_(x.mean(dim=0))
        getattr(self, f"{modality}_std").copy_(x.std(dim=0).clamp_min(1e-6))

    def _check(self, modality: str) -> None:
        """ModelError naming an unknown modality."""
        if modality not in self.inputs:
            raise ModelError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """h: the (n, 512) common-space embedding of image features or report vectors."""
        self._check(modality)
        x = (x - getattr(self, f"{modality}_mean")) / getattr(self, f"{modality}_std")
        return self.shared(self.inputs[modality](x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """P^T h for each row of h: (n, 14) label scores (logits for sigmoid)."""
        return h @ self.P


def label_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Equation (1) for one modality: mean over samples of ||P^T h - y||_2 (0 for an empty batch)."""
    if scores.shape[0] == 0:
        return scores.sum() * 0.0
    return torch.linalg.vector_norm(scores - labels.to(scores.dtype), dim=1).mean()


def multilabel_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean hinge over all valid multi-label triplets (anchor a, positive p, negative n) in the batch.

    p shares at least one positive label with a, n shares none; distances are cosine distances
    (1 - cos), the ranking used at retrieval time. Triplets that already satisfy the margin count
    in the mean as 0 ("batch-all"); 0 when the batch has no valid triplet.
    """
    y = labels.to(embeddings.dtype)
    normed = F.normalize(embeddings, dim=1)
    dist = 1.0 - normed @ normed.T
    shares = (y @ y.T) > 0
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    positive = shares & ~eye
    negative = ~shares & ~eye
    valid = positive.unsqueeze(2) & negative.unsqueeze(1)  # [a, p, n]
    if not bool(valid.any()):
        return embeddings.sum() * 0.0
    hinge = F.relu(dist.unsqueeze(2) - dist.unsqueeze(1) + margin)
    return hinge[valid].mean()


def mmdl_loss(
    heads: MMDLHeads,
    batch: dict[str, tuple[torch.Tensor, torch.Tensor]],
    triplet_weight: float = 1.0,
    margin: float = 0.2,
    report_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss: label loss summed over the modalities present (the report's times ``report_weight``)
    + weighted image triplet loss.

    ``batch`` maps a modality to (inputs, labels); either modality may be absent (unpaired data).
    Returns the loss and its parts as floats, for logging.
    """
    total = heads.P.sum() * 0.0
    parts: dict[str, float] = {}
    for modality, (x, y) in batch.items():
        h = heads.encode(x, modality)
        loss = label_loss(heads.project(h), y)
        parts[f"label_{modality}"] = float(loss.detach())
        total = total + (report_weight if modality == "report" else 1.0) * loss
        if modality == "image" and triplet_weight > 0:
            triplet = multilabel_triplet_loss(h, y, margin)
            parts["triplet_image"] = float(triplet.detach())
            total = total + triplet_weight * triplet
    parts["total"] = float(total.detach())
    return total, parts
