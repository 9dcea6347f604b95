"""A study's point in the common space, built one way for the node (indexer) and the evaluation.

Image and report embeddings have different norms (raw h of images about 3.5-6.4, of reports about
0.9-2.2), so each side is L2-normalised before the two are averaged: the report counts as much as
the images. Torch-free, so the indexer can import it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Names the rule ``study_vector`` follows; a catalog whose study vectors were built by another rule has them
# rebuilt (from the stored image and report vectors, without re-embedding) when the node opens it.
STUDY_VECTOR_RULE = "mean of unit image mean and unit report vector"


def _unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` / its L2 norm (unchanged when the norm is 0)."""
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def study_vector(image_vectors: Sequence[np.ndarray], report_vector: np.ndarray | None) -> np.ndarray | None:
    """The mean of the unit image mean and the unit report vector (either may be missing); None if both are."""
    parts = []
    if len(image_vectors):
        parts.append(_unit(np.mean(np.asarray(image_vectors, dtype=np.float64), axis=0)))
    if report_vector is not None:
        parts.append(_unit(np.asarray(report_vector, dtype=np.float64)))
    return np.mean(parts, axis=0).astype(np.float32) if parts else None
