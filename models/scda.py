"""SCDA (Selective Convolutional Descriptor Aggregation, Wei et al. 2017) object localisation.

Sum the last convolutional activations over channels into A (h x w); keep A > mean(A); take the
largest connected component (4-connectivity); its bounding box, scaled from the h x w grid back to
the image, is the patch MMDL describes. A flat map selects nothing and gives the whole image.
The scaling assumes the backbone saw the whole image stretched to its input size, which is what
``models.imaging.to_model_input`` does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.errors import ModelError


@dataclass(frozen=True)
class Box:
    """Half-open pixel box: rows top..bottom-1, columns left..right-1."""

    top: int
    left: int
    bottom: int
    right: int


def scda_mask(activations: np.ndarray) -> np.ndarray:
    """Boolean h x w mask of the largest connected region where A = sum over channels > mean(A)."""
    maps = np.asarray(activations, dtype=np.float64)
    if maps.ndim != 3 or 0 in maps.shape:
        raise ModelError(f"SCDA needs channels x h x w activations, got shape {maps.shape}")
    aggregate = maps.sum(axis=0)
    labels, count = ndimage.label(aggregate > aggregate.mean())
    if count == 0:
        return np.zeros(aggregate.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def scda_box(activations: np.ndarray, image_shape: tuple[int, int]) -> Box:
    """The SCDA patch in image pixels for an image of ``image_shape`` (rows, columns)."""
    rows, columns = image_shape
    if rows < 1 or columns < 1:
        raise ModelError(f"image shape must be positive, got {image_shape}")
    mask = scda_mask(activations)
    if not mask.any():
        return Box(0, 0, rows, columns)
    grid_rows, grid_columns = mask.shape
    hit_rows = np.flatnonzero(mask.any(axis=1))
    hit_columns = np.flatnonzero(mask.any(axis=0))
    return Box(
        top=math.floor(hit_rows[0] * rows / grid_rows),
        left=math.floor(hit_columns[0] * columns / grid_columns),
        bottom=math.ceil((hit_rows[-1] + 1) * rows / grid_rows),
        right=math.ceil((hit_columns[-1] + 1) * columns / grid_columns),
    )


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The box's pixels of a 2-D image."""
    return image[box.top : box.bottom, box.left : box.right]
