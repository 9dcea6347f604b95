"""The similar-cases answer for people: the query study and its top-k similar studies, as data.

The search is the node's own (``dicom_node.similar``): the HTTP query is turned into the same request
a similar-case C-FIND makes, so the options, their limits and the answers are the same on both doors.
A study of another patient carries no name, ID or accession number: a "reference case" number instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
from pydicom.dataset import Dataset

from config.settings import WebSettings
from dicom_node.errors import NodeError
from dicom_node.handlers import Services
from dicom_node.similar import (
    EXCLUDE_SAME_PATIENT,
    FINDINGS_FILTER,
    MIN_SCORE,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    TOP_K,
    find_similar,
    match_probability,
    parse_request,
    query_study,
    shown_findings,
)
from dicom_node.storage import check_uid
from indexer.catalog import StudyRow, from_blob
from models.observations import OBSERVATIONS

# HTTP query parameters and the private keys of the similar-case C-FIND that they set. Their text goes in
# as LO, unconverted, so that parse_request alone checks it (a bad number is its error, not pydicom's).
OPTIONS = {"top_k": TOP_K, "min_score": MIN_SCORE, "exclude_same_patient": EXCLUDE_SAME_PATIENT,
           "findings": FINDINGS_FILTER}


@dataclass(frozen=True)
class Case:
    """One study as the page shows it; ``rank`` and ``score`` are None for the query study."""

    study_uid: str
    study_date: str
    modalities: list[str]
    findings: list[dict[str, Any]]  # the calibrated findings shown: {name, probability}, most probable first
    finding_scores: dict[str, float]  # the 14 raw model scores
    report: str | None
    thumbnail: str | None
    rank: int | None = None
    score: float | None = None  # cosine similarity
    match_probability: float | None = None  # comparable across queries; None without a calibration
    same_patient: bool = True
    reference_case: str | None = None  # set for other patients' studies instead of their identifiers
    viewers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryStudy:
    """The study being read, with its own patient's identifiers."""

    patient_name: str
    patient_id: str
    accession_number: str
    study_description: str
    case: Case


@dataclass(frozen=True)
class SimilarAnswer:
    query: QueryStudy
    similar: list[Case]
    model_version: str
    calibrated: bool  # whether findings and match probabilities come from a calibration of the model

    def as_json(self) -> dict[str, Any]:
        """The answer as ``dataclasses.asdict`` gives it, without its deep copy of every value (a fifth of the
        request's CPU): the fields of a Case already hold JSON values, shared here, not copied."""
        query = self.query
        return {"query": {**vars(query), "case": vars(query.case)}, "similar": [vars(case) for case in self.similar],
                "model_version": self.model_version, "calibrated": self.calibrated}


def similar_request(study_uid: str, accession: str, options: dict[str, str]) -> Dataset:
    """The similar-case C-FIND identifier for an HTTP query (parse_request then checks it as for DICOM)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise NodeError(f"unknown query parameters: {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = check_uid(study_uid, "StudyInstanceUID") if study_uid else ""
    identifier.AccessionNumber = accession
    block = identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    for name, text in options.items():
        value = text.upper() if name == "exclude_same_patient" else text
        block.add_new(OPTIONS[name], "LO", value.replace(",", "\\") if name == "findings" else value)
    return identifier


def viewer_links(web: WebSettings, query_uid: str, other_uid: str) -> dict[str, str]:
    """Links that open both studies side by side, for each viewer whose base URL is configured."""
    links: dict[str, str] = {}
    if web.ohif_url:
        pair = urlencode([("StudyInstanceUIDs", query_uid), ("StudyInstanceUIDs", other_uid)])
        links["ohif"] = f"{web.ohif_url.rstrip('/')}/viewer?{pair}"
    if web.stone_url:  # Stone takes a comma-separated list of studies in one "study" argument
        links["stone"] = f"{web.stone_url.rstrip('/')}/index.html?study={query_uid},{other_uid}"
    if web.weasis_dicomweb_url:
        command = f'$dicom:rs --url "{web.weasis_dicomweb_url}" -r "studyUID={query_uid}" -r "studyUID={other_uid}"'
        links["weasis"] = "weasis://" + quote(command, safe="")
    return links


def iso_date(value: str) -> str:
    """YYYYMMDD as YYYY-MM-DD; anything else as held."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value


def find_answer(services: Services, identifier: Dataset, thumbnail_url: Callable[[str], str]) -> SimilarAnswer:
    """Run the similar-case search and gather what the page shows (raises NodeError subclasses)."""
    settings, catalog, calibration = services.settings, services.catalog, services.calibration
    request = parse_request(identifier, settings.query)
    query = query_study(catalog, request)
    hits = find_similar(catalog, services.index, query, request, calibration)
    pks = [query.id, *(hit.study.id for hit in hits)]
    summaries = catalog.study_summaries(pks)  # the studies' rows are loaded already
    images = catalog.first_images(pks)
    reports = catalog.current_reports(pks)

    def case(study: StudyRow, scores: np.ndarray | None, **extra: Any) -> Case:
        image = images.get(study.id)
        return Case(
            study_uid=study.study_uid,
            study_date=iso_date(study.study_date),
            modalities=list(summaries.get(study.id, {}).get("ModalitiesInStudy") or []),
            findings=[] if scores is None else [{"name": n, "probability": round(p, 4)}
                                                 for n, p in shown_findings(calibration, study, scores)],
            finding_scores={} if scores is None else {n: round(float(p), 4) for n, p in zip(OBSERVATIONS, scores)},
            report=reports.get(study.id),
            thumbnail=thumbnail_url(image[0]) if image else None,
            **extra,
        )

    similar = []
    for hit in hits:
        same = bool(query.patient_id) and hit.study.patient_id == query.patient_id
        match = match_probability(calibration, hit.study, hit.score)
        similar.append(case(hit.study, hit.finding_scores, rank=hit.rank, score=round(hit.score, 4), same_patient=same,
                            match_probability=None if match is None else round(match, 4),
                            reference_case=None if same else f"R{hit.study.id}",
                            viewers=viewer_links(settings.web, query.study_uid, hit.study.study_uid)))
    own = case(query, from_blob(query.label_scores) if query.label_scores else None)
    return SimilarAnswer(QueryStudy(query.patient_name, query.patient_id, query.accession_number,
                                    query.study_description, own), similar, query.model_version,
                         calibration is not None and query.model_version == calibration.model_version)
