"""What an answer says (dicom_node.similar): StudyDescription text and the calibrated findings of a study."""
from __future__ import annotations

import numpy as np

from dicom_node.similar import describe, match_probability, shown_findings
from indexer.schema import Study
from models.bundle_manifest import DEFAULT_MODEL_DIR
from models.calibration import load_calibration
from models.observations import OBSERVATIONS


def test_description_shows_the_match_probability_or_else_the_cosine() -> None:
    assert describe(1, 0.912, 0.97, ["Cardiomegaly", "Edema"]) == "#1 97%: Cardiomegaly, Edema"
    assert describe(2, 0.912, 0.5, []) == "#2 50%: no confident finding"
    assert describe(3, 0.912, None, []) == "#3 sim 0.91: findings not calibrated"


def test_findings_only_for_studies_embedded_by_the_calibrated_model() -> None:
    calibration = load_calibration(DEFAULT_MODEL_DIR)
    assert calibration is not None
    scores = np.full(len(OBSERVATIONS), 0.5, np.float32)
    scores[OBSERVATIONS.index("Pneumonia")] = 0.9  # raw score s = 2.2: far above any threshold
    same = Study(study_uid="1.2", model_version=calibration.model_version)
    other = Study(study_uid="1.3", model_version="mmdl-other")
    assert [name for name, _ in shown_findings(calibration, same, scores)] == ["Pneumonia"]
    assert shown_findings(calibration, other, scores) == []
    assert shown_findings(None, same, scores) == []
    assert match_probability(None, same, 0.9) is None
    assert match_probability(calibration, other, 0.9) is None
    assert match_probability(calibration, same, 0.99) > match_probability(calibration, same, 0.3)
