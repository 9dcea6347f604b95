"""Calibrated findings and the match probability (models.calibration)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models.calibration import (
    MAX_SHOWN,
    MIN_POSITIVES,
    Calibration,
    FindingCalibration,
    expected_calibration_error,
    f1_threshold,
    fit_calibration,
    fit_platt,
    isotonic,
    load_calibration,
)
from models.errors import ModelError
from models.observations import OBSERVATIONS


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibration(thresholds: dict[str, float], uncalibrated: tuple[str, ...] = ()) -> Calibration:
    """Identity Platt maps (p = stored score) with the given thresholds (0.5 elsewhere)."""
    findings = tuple(
        FindingCalibration(name, 3) if name in uncalibrated
        else FindingCalibration(name, 50, 1.0, 0.0, thresholds.get(name, 0.5))
        for name in OBSERVATIONS
    )
    return Calibration("v1", findings, ((0.0, 0.2), (0.5, 0.5), (1.0, 0.9)), {"studies": 100})


def _scores(**named: float) -> np.ndarray:
    scores = np.full(len(OBSERVATIONS), 0.1, np.float32)
    for name, value in named.items():
        scores[OBSERVATIONS.index(name.replace("_", " "))] = value
    return scores


def test_platt_recovers_the_slope_and_intercept_of_the_data() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=20000)
    y = rng.random(20000) < _sigmoid(3.0 * raw - 1.0)
    slope, intercept = fit_platt(raw, y)
    assert slope == pytest.approx(3.0, abs=0.15) and intercept == pytest.approx(-1.0, abs=0.08)


def test_platt_stays_finite_on_separable_data() -> None:
    raw = np.array([-2.0, -1.0, 1.0, 2.0])
    slope, intercept = fit_platt(raw, np.array([0, 0, 1, 1]))
    assert np.isfinite([slope, intercept]).all() and slope > 0


def test_f1_threshold_picks_the_cut_that_separates() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.2])
    y = np.array([1, 1, 1, 0, 0, 0])
    assert f1_threshold(p, y) == 0.7


def test_isotonic_fit_is_monotone_and_follows_the_rate() -> None:
    rng = np.random.default_rng(1)
    x = rng.random(5000)
    y = rng.random(5000) < x
    knots = isotonic(x, y, bins=20)
    cosines, probabilities = np.array(knots).T
    assert np.all(np.diff(cosines) >= 0) and np.all(np.diff(probabilities) >= 0)
    assert np.interp(0.1, cosines, probabilities) == pytest.approx(0.1, abs=0.06)
    assert np.interp(0.9, cosines, probabilities) == pytest.approx(0.9, abs=0.06)


def test_no_finding_is_never_shown_beside_a_disease() -> None:
    calibration = _calibration({})
    shown = calibration.shown_findings(_scores(No_Finding=0.95, Pneumonia=0.6))
    assert [name for name, _ in shown] == ["Pneumonia"]
    assert [name for name, _ in calibration.shown_findings(_scores(No_Finding=0.95))] == ["No Finding"]


def test_at_most_three_findings_most_probable_first_with_their_probabilities() -> None:
    calibration = _calibration({})
    shown = calibration.shown_findings(_scores(Edema=0.7, Cardiomegaly=0.9, Pneumonia=0.6, Atelectasis=0.8))
    assert len(shown) == MAX_SHOWN
    assert [name for name, _ in shown] == ["Cardiomegaly", "Atelectasis", "Edema"]
    assert [p for _, p in shown] == pytest.approx([0.9, 0.8, 0.7], abs=1e-6)


def test_a_finding_below_its_threshold_or_uncalibrated_is_not_shown() -> None:
    calibration = _calibration({"Edema": 0.8}, uncalibrated=("Fracture",))
    assert calibration.shown_findings(_scores(Edema=0.7, Fracture=0.99)) == []
    assert np.isnan(calibration.probabilities(_scores())[OBSERVATIONS.index("Fracture")])


def test_match_probability_interpolates_between_knots() -> None:
    calibration = _calibration({})
    assert calibration.match_probability(0.25) == pytest.approx(0.35)
    assert calibration.match_probability(1.5) == pytest.approx(0.9)


def test_fit_calibration_skips_rare_findings_and_fits_the_rest() -> None:
    rng = np.random.default_rng(2)
    n = 400
    labels = np.zeros((n, len(OBSERVATIONS)), np.int8)
    common, rare = OBSERVATIONS.index("Pneumonia"), OBSERVATIONS.index("Fracture")
    labels[:, common] = rng.random(n) < 0.4
    labels[: MIN_POSITIVES - 1, rare] = 1
    raw = rng.normal(size=(n, len(OBSERVATIONS))) * 0.1 + 0.3 * labels  # weak, under-confident scores
    vectors = rng.normal(size=(n, 8)) + 2.0 * labels[:, [common]]
    calibration = fit_calibration("v1", _sigmoid(raw), labels, vectors, [f"p{i // 2}" for i in range(n)], {})
    by_name = {f.name: f for f in calibration.findings}
    assert by_name["Fracture"].slope is None and by_name["Fracture"].positives == MIN_POSITIVES - 1
    assert by_name["Pneumonia"].slope > 1.0  # sharpened: the raw scores were squeezed near 0.5
    p = calibration.probabilities(_sigmoid(raw))[:, common]
    assert expected_calibration_error(p, labels[:, common]) < 0.08
    assert calibration.match_probability(0.9) > calibration.match_probability(-0.5)
    assert calibration.fitted_on["pairs"] == n * (n - 1) // 2 - n // 2  # same-patient pairs left out


def test_round_trip_through_model_json(tmp_path) -> None:
    calibration = _calibration({"Edema": 0.3}, uncalibrated=("Fracture",))
    (tmp_path / "model.json").write_text(json.dumps({"calibration": calibration.to_dict()}))
    assert load_calibration(tmp_path) == calibration
    (tmp_path / "model.json").write_text(json.dumps({"calibration": {**calibration.to_dict(), "format": 99}}))
    with pytest.raises(ModelError, match="format 99"):
        load_calibration(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({}))
    assert load_calibration(tmp_path) is None


def test_expected_calibration_error_of_a_perfect_and_an_overconfident_predictor() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(20000)
    y = rng.random(20000) < p
    assert expected_calibration_error(p, y) < 0.02
    assert expected_calibration_error(np.full(1000, 0.9), np.arange(1000) < 500) == pytest.approx(0.4)
