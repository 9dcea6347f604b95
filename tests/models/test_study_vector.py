"""The study vector the node indexes and the evaluation ranks (models.study)."""
from __future__ import annotations

import numpy as np
import pytest

from models.study import study_vector


def test_image_mean_and_report_count_equally_whatever_their_norms() -> None:
    images = [np.array([6.0, 0.0, 0.0]), np.array([4.0, 0.0, 0.0])]  # mean norm 5
    report = np.array([0.0, 1.0, 0.0])  # norm 1
    vector = study_vector(images, report)
    assert vector.dtype == np.float32
    assert vector.tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_one_side_alone_is_its_unit_vector_and_none_without_either() -> None:
    assert study_vector([np.array([3.0, 4.0])], None).tolist() == pytest.approx([0.6, 0.8])
    assert study_vector([], np.array([0.0, 2.0])).tolist() == pytest.approx([0.0, 1.0])
    assert study_vector([], None) is None
