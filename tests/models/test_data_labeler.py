"""The rule-based report labeler on hand-written sentences: mentions, negation, uncertainty, aggregation."""
from __future__ import annotations

import pytest

from models.errors import ModelError
from models.labeler import Policy, apply_policy, find_mentions, label_dict, label_report, normalise, report_labels
from models.observations import OBSERVATIONS


def labels(text: str) -> dict[str, int]:
    """Only the observations that the text mentions."""
    return {k: v for k, v in label_dict(text).items() if v is not None}


@pytest.mark.parametrize(
    "text, observation, expected",
    [
        # positive mentions
        ("Small left pleural effusion.", "Pleural Effusion", 1),
        ("Moderate cardiomegaly.", "Cardiomegaly", 1),
        ("The heart is enlarged.", "Cardiomegaly", 1),
        ("Heart size is mildly enlarged.", "Cardiomegaly", 1),
        ("Right upper lobe pneumonia.", "Pneumonia", 1),
        ("Large right pneumothorax.", "Pneumothorax", 1),
        ("Bibasilar atelectasis.", "Atelectasis", 1),
        ("Patchy opacity in the left lower lobe.", "Lung Opacity", 1),
        ("A 1 cm nodule in the right upper lobe.", "Lung Lesion", 1),
        ("Right lower lobe consolidation.", "Consolidation", 1),
        ("Mild interstitial pulmonary edema.", "Edema", 1),
        ("Healed left rib fractures.", "Fracture", 1),
        ("Left-sided pacemaker in place.", "Support Devices", 1),
        ("Right IJ central venous catheter tip in the SVC.", "Support Devices", 1),
        ("Endotracheal tube 4 cm above the carina.", "Support Devices", 1),
        ("Right apical pleural thickening.", "Pleural Other", 1),
        ("Widened mediastinum.", "Enlarged Cardiomediastinum", 1),
        ("The cardiomediastinal silhouette is enlarged.", "Enlarged Cardiomediastinum", 1),
        # negation before the mention
        ("No pleural effusion.", "Pleural Effusion", 0),
        ("There is no pneumothorax.", "Pneumothorax", 0),
        ("No evidence of pneumonia.", "Pneumonia", 0),
        ("Lungs are clear without consolidation.", "Consolidation", 0),
        ("Negative for pneumothorax or pleural effusion.", "Pleural Effusion", 0),
        ("Negative for pneumothorax or pleural effusion.", "Pneumothorax", 0),
        ("The lungs are free of focal airspace disease.", "Lung Opacity", 0),
        ("No focal consolidation, suspicious opacity, large effusion, or pneumothorax.", "Pneumothorax", 0),
        ("There are no XXXX of a pleural effusion.", "Pleural Effusion", 0),
        ("Resolution of the left lower lobe atelectasis.", "Atelectasis", 0),
        ("History of pneumonia.", "Pneumonia", 0),
        # negation after the mention
        ("Pneumothorax is not seen.", "Pneumothorax", 0),
        ("The left apical pneumothorax has resolved.", "Pneumothorax", 0),
        ("Pleural effusions are no longer seen.", "Pleural Effusion", 0),
        # anatomy described as normal
        ("The heart is normal in size.", "Cardiomegaly", 0),
        ("Heart size within normal limits.", "Cardiomegaly", 0),
        ("Normal heart size.", "Cardiomegaly", 0),
        ("The cardiac silhouette is not enlarged.", "Cardiomegaly", 0),
        ("The cardiomediastinal silhouette is within normal limits.", "Enlarged Cardiomediastinum", 0),
        ("Mediastinal contours are unremarkable.", "Enlarged Cardiomediastinum", 0),
        # uncertainty
        ("Possible small right effusion.", "Pleural Effusion", -1),
        ("Findings may represent pneumonia.", "Pneumonia", -1),
        ("Cannot exclude a small pneumothorax.", "Pneumothorax", -1),
        ("A small pneumothorax cannot be excluded.", "Pneumothorax", -1),
        ("Opacity which may represent atelectasis.", "Atelectasis", -1),
        ("Atelectasis versus pneumonia.", "Atelectasis", -1),
        ("Atelectasis versus pneumonia.", "Pneumonia", -1),
        ("Scarring or atelectasis at the left base.", "Atelectasis", -1),
        ("Suspicious for right lower lobe pneumonia.", "Pneumonia", -1),
        ("Questionable nodule in the right lung.", "Lung Lesion", -1),
        ("No new consolidation.", "Consolidation", -1),  # CheXpert: "no new" is uncertain
        ("Borderline heart size.", "Cardiomegaly", -1),
        ("Heart size is upper limits of normal.", "Cardiomegaly", -1),
        ("Mild pulmonary vascular congestion.", "Edema", -1),
        ("Stable cardiomediastinal silhouette.", "Enlarged Cardiomediastinum", -1),
        ("Nondisplaced rib fractures may not be demonstrated.", "Fracture", -1),
        ("Limited exam for evaluation of fractures.", "Fracture", -1),
        ("A 6 mm nodular opacity in the right upper lobe.", "Lung Lesion", 1),
    ],
)
def test_single_sentence(text: str, observation: str, expected: int) -> None:
    assert label_dict(text)[observation] == expected


@pytest.mark.parametrize(
    "text, observation",
    [
        ("Small pericardial effusion.", "Pleural Effusion"),  # unmention
        ("No acute cardiopulmonary abnormality.", "Lung Opacity"),
        ("Soft tissue density over the left breast.", "Lung Opacity"),
        ("Compression of a vertebral body collapse.", "Atelectasis"),
        ("Calcified granuloma in the right upper lobe.", "Lung Lesion"),  # granuloma: not a lesion
        ("Sequelae of prior granulomatous infection.", "Pneumonia"),
        ("Pleural thickening at the apex.", "Lung Opacity"),
        ("A 6 mm nodular opacity in the right upper lobe.", "Lung Opacity"),  # a lesion, not an opacity
        ("The lungs are clear.", "Pneumonia"),
    ],
)
def test_not_a_mention(text: str, observation: str) -> None:
    assert label_dict(text)[observation] is None


def test_negation_scope_ends_at_clause_break() -> None:
    got = labels("No pneumothorax, but there is a small left pleural effusion.")
    assert got["Pneumothorax"] == 0 and got["Pleural Effusion"] == 1


def test_negation_scope_ends_at_sentence() -> None:
    got = labels("No pneumothorax. Small right effusion.")
    assert got["Pneumothorax"] == 0 and got["Pleural Effusion"] == 1


def test_uncertainty_is_clause_bound() -> None:
    got = labels("Right lower lobe opacity which may represent atelectasis.")
    assert got["Lung Opacity"] == 1 and got["Atelectasis"] == -1


def test_pseudo_negation_is_not_negation() -> None:
    assert labels("No significant change in the right pleural effusion.")["Pleural Effusion"] == 1


def test_aggregation_positive_beats_uncertain_beats_negative() -> None:
    assert labels("No effusion on the left. Possible small effusion on the right.")["Pleural Effusion"] == -1
    assert labels("Possible left effusion. Small right pleural effusion.")["Pleural Effusion"] == 1
    assert labels("No right effusion. Small left pleural effusion.")["Pleural Effusion"] == 1


def test_no_finding_only_without_pathology() -> None:
    assert label_dict("Normal chest x-XXXX. No pneumothorax.")["No Finding"] == 1
    assert label_dict("The lungs are clear. Heart size normal.")["No Finding"] == 1
    assert label_dict("Small right effusion.")["No Finding"] is None
    assert label_dict("Possible small right effusion.")["No Finding"] is None  # uncertain blocks too
    assert label_dict("Calcified granuloma. Lungs otherwise clear.")["No Finding"] is None  # other finding
    assert label_dict("Dextroscoliosis of the thoracic spine.")["No Finding"] is None


def test_support_devices_do_not_block_no_finding() -> None:
    got = label_dict("Pacemaker in place. The lungs are clear. No effusion.")
    assert got["Support Devices"] == 1 and got["No Finding"] == 1


def test_heart_failure_makes_cardiomegaly_uncertain() -> None:
    got = labels("Findings consistent with congestive heart failure.")
    assert got["Edema"] == 1 and got["Cardiomegaly"] == -1


def test_iu_anonymisation_tokens() -> None:
    words = normalise("Normal chest x-XXXX. XXXX XXXX are intact.").split()
    assert words == ["normal", "chest", "x", "ray.", "are", "intact."]
    assert find_mentions("XXXX XXXX XXXX") == []
    assert label_dict("No XXXX pneumothorax.")["Pneumothorax"] == 0


def test_real_iu_style_report() -> None:
    text = (
        "There is XXXX increased opacity within the right upper lobe with possible mass and associated "
        "area of atelectasis or focal consolidation. The cardiac silhouette is within normal limits. "
        "No pleural effusion or pneumothorax."
    )
    got = labels(text)
    assert got == {
        "Cardiomegaly": 0,
        "Lung Opacity": 1,
        "Lung Lesion": -1,
        "Consolidation": -1,
        "Atelectasis": -1,
        "Pneumothorax": 0,
        "Pleural Effusion": 0,
    }


def test_label_report_shape_and_empty_text() -> None:
    raw = label_report("")
    assert len(raw) == len(OBSERVATIONS)
    assert raw[0] == 1 and all(v is None for v in raw[1:])  # nothing abnormal said: No Finding


def test_label_report_rejects_non_text() -> None:
    with pytest.raises(ModelError, match="string"):
        label_report(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("u-zero", (1, 0, 0, 0)),
        ("u-ones", (1, 0, 1, 0)),
        ("u-ignore", (1, 0, -1, 0)),
        (Policy.U_ONES, (1, 0, 1, 0)),
    ],
)
def test_apply_policy(policy: str | Policy, expected: tuple[int, ...]) -> None:
    assert apply_policy((1, 0, -1, None), policy) == expected


def test_apply_policy_default_is_u_zero() -> None:
    assert apply_policy((-1, None, 1)) == (0, 0, 1)


def test_apply_policy_rejects_bad_values() -> None:
    with pytest.raises(ModelError, match="u-half"):
        apply_policy((1,), "u-half")
    with pytest.raises(ModelError, match="2"):
        apply_policy((2,), "u-zero")


def test_report_labels_is_binary_for_training() -> None:
    vec = report_labels("Possible pneumonia. Small left effusion.", "u-zero")
    assert set(vec) <= {0, 1}
    assert vec[OBSERVATIONS.index("Pleural Effusion")] == 1
    assert vec[OBSERVATIONS.index("Pneumonia")] == 0
    assert report_labels("Possible pneumonia.", "u-ones")[OBSERVATIONS.index("Pneumonia")] == 1
