"""The 14 CheXpert observations that MMDL predicts, and the record every dataset reader yields."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_OBSERVATIONS = len(OBSERVATIONS)


@dataclass(frozen=True)
class Sample:
    """One training/evaluation item: an image, a report, or both, with its labels.

    ``labels`` is a binary vector over OBSERVATIONS (after the uncertainty policy), or None
    when the source gives none. ``patient_id`` is what splits are made on.
    """

    patient_id: str
    study_id: str
    source: str
    image: Path | None = None
    report: str | None = None
    labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.image is None and not self.report:
            raise ValueError(f"sample {self.study_id!r} has neither an image nor a report")
        if self.labels is not None and len(self.labels) != NUM_OBSERVATIONS:
            raise ValueError(
                f"sample {self.study_id!r}: labels must have {NUM_OBSERVATIONS} entries, got {len(self.labels)}"
            )
