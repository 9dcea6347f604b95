"""The similar-case query: a STUDY-level C-FIND naming one study returns the most similar other studies.

Door 1 (any viewer): query the similar AE title by StudyInstanceUID or AccessionNumber; each answer
carries the rank, the match probability and the calibrated findings in StudyDescription.
Door 2 (private keys): a private block (group 0099, creator PRIVATE_CREATOR) in the request may set
top-k, minimum score, exclude-same-patient and a findings filter; answers carry score, rank, model
version, calibrated findings, match probability and the raw finding scores in the same block.
What a reader sees comes from the model's calibration (``models.calibration``): ``shown_findings``
and ``match_probability`` are the two functions other views (the web page) call for the same values.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from config.settings import QuerySettings
from dicom_node.errors import NodeError
from dicom_node.identifiers import private_creator, private_tag, response, text_element
from dicom_node.status import Status
from indexer.catalog import Catalog, StudyRow, from_blob
from indexer.vector_index import IndexState, VectorIndex
from models.calibration import Calibration
from models.observations import OBSERVATIONS

PRIVATE_GROUP = 0x0099
PRIVATE_CREATOR = "MMDL SIMILARITY 1.0"
# Element offsets inside the private block: request keys ...
TOP_K, MIN_SCORE, EXCLUDE_SAME_PATIENT, FINDINGS_FILTER = 0x01, 0x02, 0x03, 0x04
REFERENCE_SHEET = 0x05  # CS YES: also build the reference sheet of these answers (dicom_node.reference_sheet)
# ... and answer keys.
SCORE, RANK, MODEL_VERSION, PREDICTED_FINDINGS, FINDING_SCORES, ORIGINAL_DESCRIPTION = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15
MATCH_PROBABILITY, FINDING_PROBABILITIES = 0x16, 0x17
STUDY_DESCRIPTION = Tag("StudyDescription")  # in an answer: rank, match and findings for a plain viewer


class UnknownStudyError(NodeError):
    """No study held under the query's key; the message names a UID, never an accession number (it is logged)."""

    status = Status.UNKNOWN_STUDY

    def __init__(self, study_uid: str) -> None:
        super().__init__(f"unknown study: {study_uid}" if study_uid else "no study held with this AccessionNumber")


class NotIndexedError(NodeError):
    status = Status.STUDY_NOT_INDEXED

    def __init__(self, study_uid: str) -> None:
        super().__init__(f"study not indexed yet, retry shortly: {study_uid}")


class IndexLoadingError(NodeError):
    """The similarity index is not ready: loading after a start (retry shortly), or its load failed (logged)."""

    status = Status.INDEX_NOT_READY

    def __init__(self, state: IndexState) -> None:
        super().__init__("similarity index loading, retry shortly" if state == "loading"
                         else f"similarity index {state}, see the node's log")


@dataclass(frozen=True)
class SimilarRequest:
    study_uid: str
    accession_number: str
    top_k: int
    min_score: float
    exclude_same_patient: bool
    search_depth: int  # how many of the most similar studies the filters look through (QuerySettings.search_depth)
    findings: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Hit:
    study: StudyRow
    rank: int
    score: float
    finding_scores: np.ndarray


def _values(value: object) -> list[str]:
    """An element's value as its list of strings, in every encoding a client may send: a string, pydicom's
    MultiValue (explicit VR, several values), or bytes (implicit VR: a private element arrives as UN)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if value is None:
        parts: list[str] = []
    elif isinstance(value, str):
        parts = value.split("\\")
    elif isinstance(value, Iterable):
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    return [text for part in parts if (text := part.strip(" \x00"))]


def _private_values(identifier: Dataset, offset: int) -> list[str]:
    try:
        return _values(identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[offset].value)
    except KeyError:
        return []


def _private_text(identifier: Dataset, offset: int) -> str:
    """A single-valued private key's text (empty when absent); several values are refused."""
    values = _private_values(identifier, offset)
    if len(values) > 1:
        raise NodeError(f"private key (0099,xx{offset:02X}) takes one value, got {len(values)}")
    return values[0] if values else ""


def _study_key(identifier: Dataset, keyword: str) -> str:
    """The one StudyInstanceUID or AccessionNumber the query names (empty when absent)."""
    values = _values(identifier[keyword].value) if keyword in identifier else []
    if len(values) > 1 or any("*" in v or "?" in v for v in values):
        raise NodeError("a similar-case query names exactly one study (no lists or wildcards)")
    return values[0] if values else ""


_FINDING_NAMES = {name.casefold(): name for name in OBSERVATIONS}


def _findings_filter(identifier: Dataset) -> tuple[str, ...]:
    """The findings filter (LO, or CS as before), matched without regard to case, as CheXpert names."""
    findings = _private_values(identifier, FINDINGS_FILTER)
    unknown = [f for f in findings if f.casefold() not in _FINDING_NAMES]
    if unknown:
        raise NodeError(f"unknown findings in the filter: {', '.join(unknown)}")
    return tuple(dict.fromkeys(_FINDING_NAMES[f.casefold()] for f in findings))


def parse_request(identifier: Dataset, defaults: QuerySettings) -> SimilarRequest:
    """Read the study key and the private options; bad values raise NodeError naming them."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level != "STUDY":
        raise NodeError(f"similar-case queries are STUDY level, got {level!r}")
    study_uid = _study_key(identifier, "StudyInstanceUID")
    accession = _study_key(identifier, "AccessionNumber")
    if not study_uid and not accession:
        raise NodeError("a similar-case query names one study by StudyInstanceUID or AccessionNumber")
    top_k_text, min_score_text = _private_text(identifier, TOP_K), _private_text(identifier, MIN_SCORE)
    try:
        top_k = int(top_k_text or defaults.top_k)
        min_score = float(min_score_text or defaults.min_score)
    except ValueError as error:
        raise NodeError(f"private query key is not a number: {error}") from None
    if not 1 <= top_k <= defaults.max_top_k:
        raise NodeError(f"top-k must be 1-{defaults.max_top_k}, got {top_k}")
    if not -1.0 <= min_score <= 1.0:
        raise NodeError(f"minimum score must be -1 to 1, got {min_score_text}")
    exclude = _private_text(identifier, EXCLUDE_SAME_PATIENT).upper()
    if exclude not in ("", "YES", "NO"):
        raise NodeError(f"exclude-same-patient must be YES or NO, got {exclude!r}")
    findings = _findings_filter(identifier)
    return SimilarRequest(
        study_uid=study_uid,
        accession_number=accession,
        top_k=top_k,
        min_score=min_score,
        exclude_same_patient=defaults.exclude_same_patient if not exclude else exclude == "YES",
        search_depth=defaults.search_depth,
        findings=findings,
    )


def query_study(catalog: Catalog, request: SimilarRequest) -> StudyRow:
    """The study the request names, indexed (UnknownStudyError, NotIndexedError otherwise)."""
    query = catalog.find_study(request.study_uid, request.accession_number)
    if query is None:
        raise UnknownStudyError(request.study_uid)
    if query.vector is None:
        raise NotIndexedError(query.study_uid)
    return query


def find_similar(
    catalog: Catalog, index: VectorIndex, query: StudyRow, request: SimilarRequest, calibration: Calibration | None = None
) -> list[Hit]:
    """The studies most similar to ``query`` (from ``query_study``), best first, after the request's filters;
    IndexLoadingError while the index loads.

    The findings filter keeps studies with one of the wanted findings among their shown findings
    (``shown_findings``); without a calibration no finding is shown, so a filter keeps nothing. The filters look
    through the ``request.search_depth`` most similar studies at most, widening the search fourfold at a time:
    a filter that few or no studies pass answers with what it found there, in bounded time. (A findings filter
    that no study passed took 5-10 s at 100k studies when the search widened to the whole index; at 1M studies
    it takes 0.03-0.13 s at depth 2,000, 0.3-0.5 s at 10,000, measured warm.)
    """
    if request.findings and calibration is None:  # it would keep nothing, after searching search_depth studies
        raise NodeError("the findings filter needs a calibrated model (mmdl-node calibrate)")
    if not index.ready:
        raise IndexLoadingError(index.state)
    vector = from_blob(query.vector)
    wanted = set(request.findings)
    hits: list[Hit] = []
    studies: dict[int, StudyRow] = {}  # read once, though each wider search returns the nearer ones again
    k = request.top_k + 1
    while True:
        labels, scores = index.search(vector, k)
        studies.update(catalog.studies([label for label in labels.tolist() if label not in studies]))
        hits = []
        for label, score in zip(labels.tolist(), scores.tolist()):
            study = studies.get(label)
            if study is None or study.id == query.id or score < request.min_score:
                continue
            if request.exclude_same_patient and study.patient_id and study.patient_id == query.patient_id:
                continue
            finding_scores = from_blob(study.label_scores) if study.label_scores else np.zeros(len(OBSERVATIONS))
            if wanted and not wanted & {name for name, _ in shown_findings(calibration, study, finding_scores)}:
                continue
            hits.append(Hit(study, len(hits) + 1, float(score), finding_scores))
            if len(hits) == request.top_k:
                return hits
        exhausted = len(labels) < k or (len(scores) and scores[-1] < request.min_score)
        if exhausted or k >= request.search_depth:
            return hits
        k = min(4 * k, request.search_depth)


def shown_findings(calibration: Calibration | None, study: StudyRow, finding_scores: np.ndarray) -> list[tuple[str, float]]:
    """The calibrated findings a reader sees for a study, most probable first, with their probabilities.

    Empty without a calibration or when the study was embedded by another model than the one calibrated.
    """
    if calibration is None or study.model_version != calibration.model_version:
        return []
    return calibration.shown_findings(finding_scores)


def match_probability(calibration: Calibration | None, study: StudyRow, cosine: float) -> float | None:
    """Probability that an answer at this cosine shares a finding with the query; None without a calibration
    or when the answer was embedded by another model than the one calibrated (its cosine means nothing there)."""
    if calibration is None or study.model_version != calibration.model_version:
        return None
    return float(calibration.match_probability(cosine))


def describe(rank: int, score: float, match: float | None, findings: list[str], limit: int = 64) -> str:
    """'#1 97%: Cardiomegaly, Edema' within a StudyDescription's 64 characters.

    The percentage is the match probability; without a calibration the cosine is shown ('#1 sim 0.93: ...').
    """
    head = f"#{rank} {match:.0%}: " if match is not None else f"#{rank} sim {score:.2f}: "
    if not findings:
        return head + ("no confident finding" if match is not None else "findings not calibrated")
    shown: list[str] = []
    for finding in findings:
        hidden = len(findings) - len(shown) - 1
        candidate = head + ", ".join([*shown, finding]) + (f" +{hidden}" if hidden else "")
        if len(candidate) > limit:
            break
        shown.append(finding)
    hidden = len(findings) - len(shown)
    return head + ", ".join(shown) + (f" +{hidden}" if hidden else "")


def hit_identifier(
    request: Dataset, hit: Hit, values: dict[str, Any], retrieve_ae: str, calibration: Calibration | None
) -> Dataset:
    """The answer for one hit, readable in a plain viewer (StudyDescription) and in the private block; ``values``
    are its study's (``Catalog.study_values``)."""
    shown = shown_findings(calibration, hit.study, hit.finding_scores)
    findings = [name for name, _ in shown]
    match = match_probability(calibration, hit.study, hit.score)
    description = describe(hit.rank, hit.score, match, findings)
    private = [
        text_element(private_tag(PRIVATE_GROUP, offset), vr, value) for offset, vr, value in (
            (SCORE, "DS", f"{hit.score:.6f}"),
            (RANK, "IS", hit.rank),
            (MODEL_VERSION, "LO", hit.study.model_version[:64]),
            (PREDICTED_FINDINGS, "LO", findings),
            (FINDING_SCORES, "DS", [f"{s:.4f}" for s in hit.finding_scores]),
            (ORIGINAL_DESCRIPTION, "LO", hit.study.study_description),
            (MATCH_PROBABILITY, "DS", None if match is None else f"{match:.4f}"),
            (FINDING_PROBABILITIES, "DS", [f"{p:.4f}" for _, p in shown]),
        )
    ]
    return response(request, "STUDY", values, retrieve_ae,
                    [text_element(STUDY_DESCRIPTION, "LO", description), private_creator(PRIVATE_GROUP, PRIVATE_CREATOR),
                     *private])


def similar_responses(
    catalog: Catalog, index: VectorIndex, request: Dataset, defaults: QuerySettings, retrieve_ae: str,
    calibration: Calibration | None = None,
) -> list[Dataset]:
    """All answer identifiers for a similar-case C-FIND request (raises NodeError subclasses)."""
    parsed = parse_request(request, defaults)
    hits = find_similar(catalog, index, query_study(catalog, parsed), parsed, calibration)
    values = catalog.study_values([hit.study.id for hit in hits])
    return [hit_identifier(request, hit, values[hit.study.id], retrieve_ae, calibration) for hit in hits]


def sheet_requested(identifier: Dataset) -> bool:
    """Whether the query asks for a reference sheet too (private key REFERENCE_SHEET: YES / NO)."""
    value = _private_text(identifier, REFERENCE_SHEET).upper()
    if value not in ("", "YES", "NO"):
        raise NodeError(f"reference-sheet option must be YES or NO, got {value!r}")
    return value == "YES"
