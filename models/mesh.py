"""Reference labels from the IU/Open-i manual MeSH tags, and the labeler's agreement with them.

An IU ``MeSH/major`` tag reads ``Term/qualifier/qualifier`` (``Opacity/lung/base/left``,
``Fractures, Bone/ribs/healed``). ``mesh_labels(tags)`` maps a report's tags to a binary vector
over ``OBSERVATIONS`` with the rules of ``TERM_TO_OBSERVATION`` plus three qualifier rules
(docs/LABEL_MAPPINGS.md gives the reasons):

- lung findings (Opacity, Density, Infiltrate, Airspace Disease, Nodule, Mass) count only when no
  qualifier names a site outside the lung (``Density/ribs``, ``Mass/breast`` do not count);
  ``round`` Opacity/Density counts as Lung Lesion, not Lung Opacity;
- ``Cardiac Shadow/enlarged``, ``Mediastinum/enlarged|prominent|widened`` and ``Thickening/pleura``,
  ``Cicatrix/pleura`` (pleural scar) count through their qualifiers;
- ``normal`` is "No Finding"; reports tagged ``No Indexing`` have no reference and are skipped.

Run ``python -m models.mesh NLMCXR_reports.tgz`` to print per-class precision / recall / F1 and
support of the labeler (positive = raw 1 under U-Zero; raw 1 or -1 under U-Ones) against these
references, on a
development part and a held-out part of the reports (report number % 5 == 0 is held out).
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from models.datasets import IUReport, iter_iu_reports
from models.labeler import Policy, apply_policy, label_report
from models.observations import NUM_OBSERVATIONS, OBSERVATIONS

TERM_TO_OBSERVATION: dict[str, tuple[str, ...]] = {
    "normal": ("No Finding",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Opacity": ("Lung Opacity",),
    "Density": ("Lung Opacity",),
    "Infiltrate": ("Lung Opacity",),
    "Airspace Disease": ("Lung Opacity",),
    "Nodule": ("Lung Lesion",),
    "Mass": ("Lung Lesion",),
    "Pulmonary Edema": ("Edema",),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Pulmonary Atelectasis": ("Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Hydropneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "Hemopneumothorax": ("Pneumothorax", "Pleural Effusion"),
    "Pleural Effusion": ("Pleural Effusion",),
    "Hemothorax": ("Pleural Effusion",),
    "Fractures, Bone": ("Fracture",),
    "Catheters, Indwelling": ("Support Devices",),
    "Implanted Medical Device": ("Support Devices",),
    "Tube, Inserted": ("Support Devices",),
    "Medical Device": ("Support Devices",),
    "Stents": ("Support Devices",),
    "Surgical Instruments": ("Support Devices",),
    "Sutures": ("Support Devices",),
}
QUALIFIED: dict[tuple[str, str], str] = {
    ("Cardiac Shadow", "enlarged"): "Cardiomegaly",
    ("Mediastinum", "enlarged"): "Enlarged Cardiomediastinum",
    ("Mediastinum", "prominent"): "Enlarged Cardiomediastinum",
    ("Mediastinum", "widened"): "Enlarged Cardiomediastinum",
    ("Thickening", "pleura"): "Pleural Other",
    ("Cicatrix", "pleura"): "Pleural Other",
}
LUNG_TERMS = frozenset({"Opacity", "Density", "Infiltrate", "Airspace Disease", "Nodule", "Mass"})
NON_LUNG_SITES = frozenset({
    "breast", "ribs", "clavicle", "mediastinum", "paratracheal", "heart", "adipose tissue", "abdomen",
    "sternum", "humerus", "shoulder", "thoracic vertebrae", "lumbar vertebrae", "spine", "diaphragm",
    "mitral valve", "pleura", "heart ventricles", "aorta", "neck", "cervical vertebrae", "trachea",
})  # fmt: skip
NOT_INDEXED = "No Indexing"
POLICIES = (Policy.U_ZERO.value, Policy.U_ONES.value)
_INDEX = {name: i for i, name in enumerate(OBSERVATIONS)}


def mesh_labels(tags: Iterable[str]) -> tuple[int, ...]:
    """Binary reference vector over OBSERVATIONS from a report's MeSH major tags."""
    vec = [0] * NUM_OBSERVATIONS
    for tag in tags:
        term, *quals = [part.strip() for part in tag.split("/")]
        quals = [q.lower() for q in quals]
        if term in LUNG_TERMS and NON_LUNG_SITES.intersection(quals):
            continue
        targets = list(TERM_TO_OBSERVATION.get(term, ()))
        if term in ("Opacity", "Density") and "round" in quals:
            targets = ["Lung Lesion"]
        targets += [obs for (t, q), obs in QUALIFIED.items() if t == term and q in quals]
        for obs in targets:
            vec[_INDEX[obs]] = 1
    return tuple(vec)


@dataclass(frozen=True)
class ClassScore:
    """Agreement of one observation: counts and precision / recall / F1 (None when undefined)."""

    name: str
    support: int
    predicted: int
    true_positive: int

    @property
    def precision(self) -> float | None:
        return self.true_positive / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.true_positive / self.support if self.support else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)


def agreement(predicted: np.ndarray, reference: np.ndarray, names: Sequence[str] = OBSERVATIONS) -> list[ClassScore]:
    """Per-class counts of binary predictions against binary references, both (n, classes)."""
    pred, ref = np.asarray(predicted).astype(bool), np.asarray(reference).astype(bool)
    return [
        ClassScore(name, int(ref[:, c].sum()), int(pred[:, c].sum()), int((pred[:, c] & ref[:, c]).sum()))
        for c, name in enumerate(names)
    ]


def micro_f1(scores: Sequence[ClassScore]) -> float:
    """Micro-averaged F1 over the given classes."""
    tp = sum(s.true_positive for s in scores)
    denominator = sum(s.predicted for s in scores) + sum(s.support for s in scores)
    return 2 * tp / denominator if denominator else 0.0


def is_held_out(report: IUReport) -> bool:
    """The held-out fifth of IU reports: report number divisible by 5 (fixed before tuning)."""
    digits = re.sub(r"\D", "", report.uid)
    return bool(digits) and int(digits) % 5 == 0


def evaluate(reports: Iterable[IUReport]) -> dict[str, tuple[int, dict[str, list[ClassScore]]]]:
    """Labeler against MeSH references: {part: (number of reports, {policy: scores})}.

    A labeler positive is a raw 1 under U-Zero, a raw 1 or -1 under U-Ones.
    """
    Raw = list[tuple[int | None, ...]]
    parts: dict[str, tuple[Raw, list[tuple[int, ...]]]] = {"dev": ([], []), "held-out": ([], [])}
    for report in reports:
        if not report.text.strip() or not report.mesh_major or NOT_INDEXED in report.mesh_major:
            continue
        raw, ref = parts["held-out" if is_held_out(report) else "dev"]
        raw.append(label_report(report.text))
        ref.append(mesh_labels(report.mesh_major))
    result = {}
    for name, (raw, ref) in parts.items():
        if raw:
            by_policy = {policy: np.array([apply_policy(r, policy) for r in raw]) for policy in POLICIES}
            result[name] = (len(raw), {policy: agreement(p, np.array(ref)) for policy, p in by_policy.items()})
    return result


def _fmt(value: float | None) -> str:
    """Three decimals, or "-" for an undefined ratio."""
    return "-" if value is None else f"{value:.3f}"


def markdown_table(scores: Sequence[ClassScore]) -> str:
    """A Markdown table of per-class precision / recall / F1 / support / predicted positives."""
    lines = [
        "| observation | precision | recall | F1 | support (MeSH +) | labeler + |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in scores:
        ratios = " | ".join(_fmt(v) for v in (s.precision, s.recall, s.f1))
        lines.append(f"| {s.name} | {ratios} | {s.support} | {s.predicted} |")
    scored = [s for s in scores if s.support]
    support = sum(s.support for s in scored)
    lines.append(f"| micro average (classes with support) | | | {_fmt(micro_f1(scored))} | {support} | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the agreement tables for an IU reports archive."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tgz", help="NLMCXR_reports.tgz (Open-i/IU XML reports)")
    args = parser.parse_args(argv)
    for part, (count, by_policy) in evaluate(iter_iu_reports(args.tgz)).items():
        for policy, scores in by_policy.items():
            print(f"## {part}: {count} reports, {policy}\n\n{markdown_table(scores)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
