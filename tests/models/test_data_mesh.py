"""IU MeSH tags -> CheXpert reference labels, and the agreement counts of the labeler check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.datasets import IUReport
from models.mesh import agreement, evaluate, is_held_out, markdown_table, mesh_labels, micro_f1
from models.observations import OBSERVATIONS


def positives(tags: list[str]) -> set[str]:
    return {name for name, v in zip(OBSERVATIONS, mesh_labels(tags)) if v}


@pytest.mark.parametrize(
    "tags, expected",
    [
        (["normal"], {"No Finding"}),
        (["Opacity/lung/base/left"], {"Lung Opacity"}),
        (["Opacity/lung/hilum/right/round"], {"Lung Lesion"}),
        (["Density/ribs/left"], set()),  # not in the lung
        (["Mass/breast"], set()),
        (["Nodule/lung/right"], {"Lung Lesion"}),
        (["Cardiac Shadow/enlarged"], {"Cardiomegaly"}),
        (["Cardiac Shadow/obscured"], set()),
        (["Mediastinum/prominent"], {"Enlarged Cardiomediastinum"}),
        (["Thickening/pleura/right"], {"Pleural Other"}),
        (["Cicatrix/pleura/apex"], {"Pleural Other"}),
        (["Cicatrix/lung/base"], set()),
        (["Hydropneumothorax/right"], {"Pneumothorax", "Pleural Effusion"}),
        (["Fractures, Bone/ribs/healed", "Catheters, Indwelling/right"], {"Fracture", "Support Devices"}),
        (["Pulmonary Congestion", "Calcified Granuloma/lung", "Costophrenic Angle/blunted"], set()),
    ],
)
def test_mesh_labels(tags: list[str], expected: set[str]) -> None:
    assert positives(tags) == expected


def test_agreement_counts() -> None:
    pred = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    ref = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    first, second = agreement(pred, ref, names=("a", "b"))
    assert (first.support, first.predicted, first.true_positive) == (2, 2, 1)
    assert first.precision == first.recall == first.f1 == 0.5
    assert (second.precision, second.recall) == (0.5, 1.0)
    assert second.f1 == pytest.approx(2 / 3)
    assert micro_f1([first, second]) == pytest.approx(2 * 2 / (4 + 3))
    assert "| a | 0.500 | 0.500 | 0.500 | 2 | 2 |" in markdown_table([first, second])


def test_evaluate_splits_and_skips() -> None:
    reports = [
        IUReport("CXR1", "Small left pleural effusion.", "", ("Pleural Effusion/left",)),
        IUReport("CXR5", "Normal chest.", "", ("normal",)),
        IUReport("CXR6", "No effusion.", "", ("No Indexing",)),
        IUReport("CXR7", "", "", ("normal",)),
    ]
    assert [is_held_out(r) for r in reports] == [False, True, False, False]
    result = evaluate(reports)
    dev_count, dev = result["dev"]
    held_count, held = result["held-out"]
    assert (dev_count, held_count) == (1, 1)
    effusion = dev["u-zero"][OBSERVATIONS.index("Pleural Effusion")]
    assert (effusion.support, effusion.true_positive) == (1, 1)
    assert held["u-zero"][0].true_positive == 1  # No Finding


def test_real_iu_agreement_is_reasonable(shared_data: Path) -> None:
    from models.datasets import iter_iu_reports

    count, scores = evaluate(iter_iu_reports(shared_data / "iu-reports" / "NLMCXR_reports.tgz"))["held-out"]
    assert count > 500
    assert micro_f1([s for s in scores["u-zero"] if s.support]) > 0.8  # measured 0.896 (docs/LABELER.md)
