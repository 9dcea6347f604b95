"""SCDA on synthetic activation maps with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from models.errors import ModelError
from models.scda import Box, crop, scda_box, scda_mask


def maps_with(*blobs: tuple[slice, slice], grid: int = 8, channels: int = 4) -> np.ndarray:
    """channels x grid x grid activations: low noise everywhere, strong on each blob."""
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.0, 0.1, size=(channels, grid, grid))
    for rows, columns in blobs:
        maps[:, rows, columns] += 5.0
    return maps


def test_one_blob_gives_its_box_scaled_to_the_image() -> None:
    maps = maps_with((slice(2, 5), slice(3, 7)))
    mask = scda_mask(maps)
    assert mask.sum() == 12 and mask[2:5, 3:7].all()
    # An 8 x 8 grid over an 800 x 400 image: one cell is 100 rows x 50 columns.
    assert scda_box(maps, (800, 400)) == Box(top=200, left=150, bottom=500, right=350)


def test_two_blobs_keep_the_larger() -> None:
    maps = maps_with((slice(0, 2), slice(0, 2)), (slice(4, 8), slice(4, 7)))
    assert scda_box(maps, (8, 8)) == Box(4, 4, 8, 7)


def test_diagonal_cells_are_not_connected() -> None:
    maps = maps_with((slice(0, 1), slice(0, 1)), (slice(1, 2), slice(1, 2)), (slice(5, 7), slice(5, 6)))
    assert scda_box(maps, (8, 8)) == Box(5, 5, 7, 6)


def test_flat_map_gives_the_whole_image() -> None:
    assert not scda_mask(np.ones((3, 5, 5))).any()
    assert scda_box(np.ones((3, 5, 5)), (123, 45)) == Box(0, 0, 123, 45)


def test_box_rounds_outwards_on_uneven_grids() -> None:
    maps = maps_with((slice(1, 2), slice(1, 2)), grid=3)
    box = scda_box(maps, (10, 10))
    assert box == Box(top=3, left=3, bottom=7, right=7)
    assert crop(np.arange(100).reshape(10, 10), box).shape == (4, 4)


def test_bad_activations_raise() -> None:
    with pytest.raises(ModelError, match="channels x h x w"):
        scda_mask(np.ones((4, 4)))
    with pytest.raises(ModelError, match="positive"):
        scda_box(np.ones((1, 4, 4)), (0, 10))
