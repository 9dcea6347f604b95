"""Dataset readers that yield ``models.observations.Sample``, the CSV manifest, and patient splits.

Public API (stable; the training and evaluation commands call these):

- ``read_manifest(path) -> list[Sample]`` / ``write_manifest(samples, path) -> None``: the CSV
  manifest with columns ``image, report, labels, patient_id, study_id, source``. ``labels`` holds
  the ``|``-joined names of the positive CheXpert observations; an EMPTY cell means unlabelled
  (``Sample.labels is None``) and ``-`` means labelled with no positive observation. Relative
  image paths are resolved against the manifest's folder (and written relative to it); image
  paths read back are absolute. Only ``image``, ``report`` and ``labels`` are required; a missing
  ``patient_id`` falls back to ``study_id``, a missing ``study_id`` to the image path or the row number.
- ``read_iu_reports(tgz, policy="u-zero") -> list[Sample]``: Open-i/IU XML reports (report-only),
  text = FINDINGS + IMPRESSION, labels from ``models.labeler``. ``iter_iu_reports(tgz)`` yields
  the parsed ``IUReport`` records (id, findings, impression, MeSH major tags).
- ``read_nih(path) -> list[Sample]``: NIH ChestX-ray14 ``labels.csv`` (or its folder), image-only,
  NIH findings mapped by ``NIH_TO_CHEXPERT`` (Google 2019 adjudicated columns override where filled).
- ``read_covid(path) -> list[Sample]``: the COVID set's ``records.csv`` (or its folder): image +
  clinical note as report; labels from its ``labels`` column by ``COVID_TO_CHEXPERT``; ``todo``
  rows are unlabelled (labels None).
- ``read_mimic(root, policy="u-zero", reports=None, frontal_only=True) -> list[Sample]``:
  MIMIC-CXR-JPG layout (``mimic-cxr-2.0.0-chexpert.csv[.gz]`` + ``files/pXX/pXXXXXXXX/sXXXXXXXX/*.jpg``,
  optional ``mimic-cxr-2.0.0-metadata.csv[.gz]`` for the view; optional report folder).
- ``read_chexpert(csv_path, policy="u-zero", root=None, frontal_only=True) -> list[Sample]``:
  CheXpert ``train.csv``/``valid.csv`` layout (``Path``, ``Frontal/Lateral``, 14 columns 1/0/-1/blank).
- ``split_by_patient(samples, fractions, seed=0) -> list[list[Sample]]``: deterministic split of
  PATIENTS (never images) into len(fractions) parts, independent of input order.

Patient ids are prefixed with the source (``nih:1280``, ``iu:CXR1``, ``covid:2``, ``mimic:10000032``,
``chexpert:patient00001``) so that ids of different sources never merge in a split.
All label mappings between sources are written down in docs/LABEL_MAPPINGS.md.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import random
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from models.errors import ModelError
from models.labeler import Policy, apply_policy, label_report
from models.observations import NUM_OBSERVATIONS, OBSERVATIONS, Sample

MANIFEST_COLUMNS = ("image", "report", "labels", "patient_id", "study_id", "source")
NO_POSITIVE = "-"
_INDEX = {name: i for i, name in enumerate(OBSERVATIONS)}

NIH_TO_CHEXPERT: dict[str, str | None] = {
    "No Finding": "No Finding",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Emphysema": None,
    "Fibrosis": None,
    "Hernia": None,
}
GOOGLE2019_TO_CHEXPERT: dict[str, str] = {
    "google2019_fracture": "Fracture",
    "google2019_pneumothorax": "Pneumothorax",
    "google2019_airspace_opacity": "Lung Opacity",
    "google2019_nodule_or_mass": "Lung Lesion",
}
_PNEUMONIAS = (
    "COVID-19", "SARS", "Pneumocystis", "Pneumonia", "Klebsiella", "Streptococcus", "E.Coli",
    "Mycoplasma Bacterial Pneumonia", "Legionella", "Bacterial", "Lipoid", "MERS", "Viral", "Fungal",
    "Chlamydophila", "Aspiration", "Influenza", "Varicella", "Nocardia", "Herpes", "Tuberculosis",
)  # fmt: skip
COVID_TO_CHEXPERT: dict[str, str | None] = {
    **{name: "Pneumonia" for name in _PNEUMONIAS},
    "ARDS": "Lung Opacity",
    "No Finding": "No Finding",
}
COVID_UNLABELLED = "todo"


@dataclass(frozen=True)
class IUReport:
    """One Open-i/IU XML report: its id, text sections and manual MeSH major tags."""

    uid: str
    findings: str
    impression: str
    mesh_major: tuple[str, ...]

    @property
    def text(self) -> str:
        """FINDINGS then IMPRESSION, the text MMDL and the labeler read."""
        return "\n".join(part for part in (self.findings, self.impression) if part)


# ---------------------------------------------------------------- labels helpers


def labels_from_names(names: Iterable[str], where: str) -> tuple[int, ...]:
    """Binary vector from CheXpert observation names; ``where`` names the source in errors."""
    vec = [0] * NUM_OBSERVATIONS
    for name in names:
        if name not in _INDEX:
            raise ModelError(f"{where}: unknown CheXpert observation {name!r}")
        vec[_INDEX[name]] = 1
    return tuple(vec)


def _with_no_finding_rule(vec: list[int]) -> tuple[int, ...]:
    """Clear "No Finding" when a pathology (not Support Devices) is positive."""
    pathology = any(v == 1 for name, v in zip(OBSERVATIONS, vec) if name not in ("No Finding", "Support Devices"))
    if pathology:
        vec[_INDEX["No Finding"]] = 0
    return tuple(vec)


def _mapped(names: Iterable[str], mapping: dict[str, str | None], where: str) -> list[int]:
    """Binary vector (as a list) of source findings through a mapping; unknown names are errors."""
    vec = [0] * NUM_OBSERVATIONS
    for name in names:
        if name not in mapping:
            raise ModelError(f"{where}: finding {name!r} has no entry in the label mapping")
        target = mapping[name]
        if target is not None:
            vec[_INDEX[target]] = 1
    return vec


def _raw_from_chexpert_row(row: dict[str, str], where: str) -> tuple[int | None, ...]:
    """Raw 1/0/-1/None labels from the 14 CheXpert-style columns (1.0, 0.0, -1.0, blank)."""
    raw: list[int | None] = []
    for name in OBSERVATIONS:
        cell = (row[name] or "").strip()
        if not cell:
            raw.append(None)
            continue
        try:
            value = int(float(cell))
        except ValueError:
            raise ModelError(f"{where}: column {name!r} holds {cell!r}, expected 1, 0, -1 or blank") from None
        if value not in (1, 0, -1):
            raise ModelError(f"{where}: column {name!r} holds {cell!r}, expected 1, 0, -1 or blank")
        raw.append(value)
    return tuple(raw)


def _read_csv(path: Path, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV (optionally .gz) as dicts; a missing file or a missing column is a ModelError."""
    if not path.is_file():
        raise ModelError(f"CSV file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise ModelError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
        return list(reader)


def _csv_in(path: str | Path, name: str) -> Path:
    """``path`` itself if it is a file, else ``path/name``."""
    p = Path(path)
    return p / name if p.is_dir() else p


# ---------------------------------------------------------------- manifest


def read_manifest(path: str | Path) -> list[Sample]:
    """Samples of a CSV manifest (see the module docstring for its columns)."""
    path = Path(path)
    rows = _read_csv(path, ("image", "report", "labels"))
    samples = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}:{number}"
        image_cell = (row.get("image") or "").strip()
        image = Path(os.path.normpath(path.absolute().parent / image_cell)) if image_cell else None
        cell = (row.get("labels") or "").strip()
        if not cell:
            labels = None
        elif cell == NO_POSITIVE:
            labels = (0,) * NUM_OBSERVATIONS
        else:
            labels = labels_from_names((n.strip() for n in cell.split("|")), where)
        study = (row.get("study_id") or "").strip() or image_cell or f"row{number}"
        try:
            samples.append(
                Sample(
                    patient_id=(row.get("patient_id") or "").strip() or study,
                    study_id=study,
                    source=(row.get("source") or "").strip() or "manifest",
                    image=image,
                    report=row.get("report") or None,
                    labels=labels,
                )
            )
        except ValueError as exc:
            raise ModelError(f"{where}: {exc}") from None
    return samples


def _label_cell(labels: tuple[int, ...] | None, where: str) -> str:
    """The manifest ``labels`` cell of a binary label vector."""
    if labels is None:
        return ""
    if any(v not in (0, 1) for v in labels):
        raise ModelError(f"{where}: the manifest holds binary labels; apply U-Zero or U-Ones first, got {labels}")
    names = [name for name, v in zip(OBSERVATIONS, labels) if v == 1]
    return "|".join(names) if names else NO_POSITIVE


def write_manifest(samples: Iterable[Sample], path: str | Path) -> None:
    """Write samples as a CSV manifest; image paths become relative to the manifest folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for s in samples:
            image = ""
            if s.image is not None:
                image = Path(os.path.relpath(Path(s.image).resolve(), folder)).as_posix()
            writer.writerow(
                {
                    "image": image,
                    "report": s.report or "",
                    "labels": _label_cell(s.labels, f"sample {s.study_id!r}"),
                    "patient_id": s.patient_id,
                    "study_id": s.study_id,
                    "source": s.source,
                }
            )


# ---------------------------------------------------------------- Open-i / IU


def iter_iu_reports(tgz: str | Path) -> Iterator[IUReport]:
    """Parse every XML report of the Open-i/IU ``NLMCXR_reports.tgz``, in file-name order."""
    tgz = Path(tgz)
    if not tgz.is_file():
        raise ModelError(f"IU reports archive not found: {tgz}")
    try:
        with tarfile.open(tgz, "r:*") as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")),
                             key=lambda m: m.name)  # fmt: skip
            for member in members:
                handle = archive.extractfile(member)
                if handle is not None:
                    yield _parse_iu_xml(handle.read(), member.name)
    except tarfile.TarError as exc:
        raise ModelError(f"{tgz}: not a readable tar archive ({exc})") from None


def _parse_iu_xml(data: bytes, name: str) -> IUReport:
    """One IU report from its XML bytes."""
    try:
        root = ET.parse(io.BytesIO(data)).getroot()
    except ET.ParseError as exc:
        raise ModelError(f"{name}: malformed XML ({exc})") from None
    uid_node = root.find("uId")
    uid = uid_node.get("id", "") if uid_node is not None else ""
    sections = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
    mesh = tuple((m.text or "").strip() for m in root.findall("MeSH/major"))
    return IUReport(uid or Path(name).stem, sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""), mesh)


def read_iu_reports(tgz: str | Path, policy: Policy | str = Policy.U_ZERO) -> list[Sample]:
    """Report-only samples of the IU archive (reports with no FINDINGS and no IMPRESSION skipped)."""
    samples = []
    for report in iter_iu_reports(tgz):
        if report.text.strip():
            samples.append(
                Sample(
                    patient_id=f"iu:{report.uid}",
                    study_id=report.uid,
                    source="iu",
                    report=report.text,
                    labels=apply_policy(label_report(report.text), policy),
                )
            )
    return samples


# ---------------------------------------------------------------- NIH ChestX-ray14


def read_nih(path: str | Path) -> list[Sample]:
    """Image-only samples of NIH ChestX-ray14 ``labels.csv`` (path to it or to its folder)."""
    csv_path = _csv_in(path, "labels.csv")
    samples = []
    for number, row in enumerate(_read_csv(csv_path, ("image", "labels", "patient_id")), start=2):
        where = f"{csv_path}:{number}"
        vec = _mapped((n.strip() for n in row["labels"].split("|") if n.strip()), NIH_TO_CHEXPERT, where)
        for column, target in GOOGLE2019_TO_CHEXPERT.items():
            verdict = (row.get(column) or "").strip().upper()
            if verdict in ("YES", "NO"):
                vec[_INDEX[target]] = int(verdict == "YES")
        image = csv_path.parent / row["image"]
        samples.append(
            Sample(f"nih:{row['patient_id']}", Path(row["image"]).stem, "nih", image=image,
                   labels=_with_no_finding_rule(vec))  # fmt: skip
        )
    return samples


# ---------------------------------------------------------------- COVID set


def read_covid(path: str | Path) -> list[Sample]:
    """Image + clinical-note samples of the COVID set's ``records.csv`` (``todo`` = unlabelled)."""
    csv_path = _csv_in(path, "records.csv")
    samples = []
    columns = ("id", "image_file", "labels", "patientid")
    for number, row in enumerate(_read_csv(csv_path, columns), start=2):
        names = [n.strip() for n in row["labels"].split("|") if n.strip()]
        labels = None
        if names and names != [COVID_UNLABELLED]:
            labels = _with_no_finding_rule(_mapped(names, COVID_TO_CHEXPERT, f"{csv_path}:{number}"))
        samples.append(
            Sample(
                patient_id=f"covid:{row['patientid']}",
                study_id=row["id"],
                source="covid",
                image=csv_path.parent / row["image_file"],
                report=(row.get("report_text") or "").strip() or None,
                labels=labels,
            )
        )
    return samples


# ---------------------------------------------------------------- MIMIC-CXR-JPG

_REPORT_SECTION = re.compile(r"^\s*(FINDINGS|IMPRESSION)\s*:", re.IGNORECASE | re.MULTILINE)
_ANY_SECTION = re.compile(r"^\s*[A-Z][A-Z /&()]+:", re.MULTILINE)


def findings_and_impression(report: str) -> str:
    """FINDINGS and IMPRESSION sections of a free-text report; the whole text when it has neither."""
    parts = []
    for m in _REPORT_SECTION.finditer(report):
        rest = report[m.end():]
        nxt = _ANY_SECTION.search(rest)
        parts.append(rest[: nxt.start()] if nxt else rest)
    text = "\n".join(p.strip() for p in parts if p.strip())
    return text or report.strip()


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that exists in ``folder``."""
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_mimic(
    root: str | Path,
    policy: Policy | str = Policy.U_ZERO,
    reports: str | Path | None = None,
    frontal_only: bool = True,
) -> list[Sample]:
    """Samples of a MIMIC-CXR-JPG tree: one per JPEG, labels from the study's CheXpert row.

    ``reports`` is an optional folder of MIMIC-CXR reports laid out as ``pXX/pXXXXXXXX/sXXXXXXXX.txt``
    (or with a leading ``files/``). With the metadata CSV present and ``frontal_only``, only PA/AP
    images are kept; without it every image is kept.
    """
    root = Path(root)
    label_csv = _first_existing(root, ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-chexpert.csv.gz"))
    if label_csv is None:
        raise ModelError(f"{root}: mimic-cxr-2.0.0-chexpert.csv(.gz) not found")
    labels = {}
    for number, row in enumerate(_read_csv(label_csv, ("subject_id", "study_id", *OBSERVATIONS)), start=2):
        raw = _raw_from_chexpert_row(row, f"{label_csv}:{number}")
        labels[(row["subject_id"], row["study_id"])] = apply_policy(raw, policy)
    views: dict[str, str] = {}
    meta_csv = _first_existing(root, ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz"))
    if meta_csv is not None:
        meta = _read_csv(meta_csv, ("dicom_id", "ViewPosition"))
        views = {row["dicom_id"]: (row["ViewPosition"] or "").upper() for row in meta}
    samples = []
    for (subject, study), vec in sorted(labels.items()):
        rel = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        report = _mimic_report(Path(reports), rel) if reports is not None else None
        for image in sorted((root / rel).glob("*.jpg")):
            if frontal_only and views and views.get(image.stem) not in ("PA", "AP"):
                continue
            samples.append(Sample(f"mimic:{subject}", f"s{study}", "mimic", image=image, report=report, labels=vec))
    return samples


def _mimic_report(folder: Path, study_rel: Path) -> str | None:
    """FINDINGS + IMPRESSION of a study's report file, or None when it is absent."""
    for base in (folder, folder / "files"):
        candidate = base / study_rel.relative_to("files").with_suffix(".txt")
        if candidate.is_file():
            return findings_and_impression(candidate.read_text(encoding="utf-8")) or None
    return None


# ---------------------------------------------------------------- CheXpert


def read_chexpert(
    csv_path: str | Path,
    policy: Policy | str = Policy.U_ZERO,
    root: str | Path | None = None,
    frontal_only: bool = True,
) -> list[Sample]:
    """Image-only samples of a CheXpert ``train.csv``/``valid.csv``.

    ``Path`` values (e.g. ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``) are
    resolved against ``root``, by default the folder ABOVE the CSV's folder, as the dataset ships.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent.parent
    samples = []
    for number, row in enumerate(_read_csv(csv_path, ("Path", *OBSERVATIONS)), start=2):
        where = f"{csv_path}:{number}"
        if frontal_only and (row.get("Frontal/Lateral") or "Frontal").strip() != "Frontal":
            continue
        rel = Path(row["Path"])
        patient = next((p for p in rel.parts if p.startswith("patient")), None)
        if patient is None:
            raise ModelError(f"{where}: no patientNNNNN folder in Path {row['Path']!r}")
        study = "/".join(rel.parts[rel.parts.index(patient): -1])
        raw = _raw_from_chexpert_row(row, where)
        samples.append(
            Sample(f"chexpert:{patient}", study, "chexpert", image=base / rel, labels=apply_policy(raw, policy))
        )
    return samples


# ---------------------------------------------------------------- splits


def split_by_patient(samples: Sequence[Sample], fractions: Sequence[float], seed: int = 0) -> list[list[Sample]]:
    """Split samples into parts by PATIENT, with roughly ``fractions`` of the patients in each part.

    Deterministic for a seed and independent of the order of ``samples``; every patient lands in
    exactly one part; samples keep their input order within a part.
    """
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ModelError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")
    patients = sorted({s.patient_id for s in samples})
    random.Random(seed).shuffle(patients)
    part_of: dict[str, int] = {}
    cumulative, start = 0.0, 0
    for part, fraction in enumerate(fractions):
        cumulative += fraction
        stop = len(patients) if part == len(fractions) - 1 else round(cumulative * len(patients))
        for patient in patients[start:stop]:
            part_of[patient] = part
        start = stop
    parts: list[list[Sample]] = [[] for _ in fractions]
    for s in samples:
        parts[part_of[s.patient_id]].append(s)
    return parts
