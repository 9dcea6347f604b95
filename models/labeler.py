"""Rule-based CheXpert-style labeler of the 14 observations from free-text report text.

Three stages, as in the CheXpert labeler (Irvin et al. 2019), with regular expressions and
clause scopes in place of its dependency parse:

1. mention extraction: per observation, phrase patterns (``FINDINGS``: the finding itself, e.g.
   "pleural effusion"; ``ANATOMY``: a structure whose description carries the finding, e.g.
   "heart size", "mediastinal contour"), minus ``UNMENTIONS`` ("pericardial effusion");
2. classification of each mention as negative (0), uncertain (-1) or positive (1) from cues in
   its clause: uncertainty cues that must win over negation ("cannot exclude", "no new"), then
   negation cues ("no", "without", "free of", "no evidence of", "X is not seen", "X has
   resolved", for anatomy also "X is normal / within normal limits"), then uncertainty cues
   ("possible", "may represent", "versus", "X or Y", "borderline");
3. aggregation per observation: positive beats uncertain beats negative; "No Finding" is 1 only
   when no pathology (Support Devices excepted) and no other abnormality (``OTHER_FINDINGS``:
   emphysema, granuloma, scoliosis, ...) is positive or uncertain, and None otherwise.

Public API (stable):

- ``label_report(text) -> tuple[int | None, ...]``: raw labels in ``OBSERVATIONS`` order,
  1 / 0 / -1 / None (not mentioned).
- ``label_dict(text) -> dict[str, int | None]``: the same keyed by observation name.
- ``find_mentions(text) -> list[Mention]``: the classified mentions, for inspection and tests.
- ``Policy`` (``U_ZERO`` "u-zero" default, ``U_ONES`` "u-ones", ``U_IGNORE`` "u-ignore") and
  ``apply_policy(raw, policy="u-zero") -> tuple[int, ...]``: None -> 0, -1 -> 0 (U-Zero) or 1
  (U-Ones) or kept as -1 (U-Ignore: the trainer masks those entries out of the loss).
- ``report_labels(text, policy="u-zero") -> tuple[int, ...]``: ``apply_policy(label_report(text))``.

IU/Open-i anonymisation tokens (``XXXX``) are dropped before matching ("x-XXXX" reads "x-ray").
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from models.errors import ModelError
from models.observations import OBSERVATIONS

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
OTHER = "Other"  # abnormalities outside the 14 observations; they only block "No Finding"

_CARDIAC = r"(?:cardiac|heart|cardiopericardial)"
_LINE_KINDS = (
    r"(?:picc|central(?: venous)?|venous|ij|internal jugular|jugular|subclavian|dialysis|hemodialysis|"
    r"swan ganz|pa|pulmonary artery|arterial|port|catheter|tunneled|triple lumen)"
)

# Phrases naming the finding itself: a mention is positive unless a cue says otherwise.
FINDINGS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"(?:widened|widening of the|enlarged|prominent) (?:superior )?mediastin\w*",
        r"mediastinal (?:widening|enlargement|prominence)",
        r"enlarged cardiomediastin\w*",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"cardiac (?:enlargement|prominence)",
        r"enlarged (?:heart|cardiac (?:silhouette|shadow|size|contour))",
        r"enlargement of the (?:heart|cardiac silhouette)",
    ),
    "Lung Opacity": (
        r"opaci(?:ty|ties|fication|fied)",
        r"infiltrat(?:e|es|ion|ive)",
        r"air ?space (?:disease|process|opacit\w*)",
        r"densit(?:y|ies)",
        r"haz(?:e|y|iness)",
        r"ground glass",
    ),
    "Lung Lesion": (
        r"mass(?:es)?",
        r"nodul(?:e|es|ar(?: densit\w*| opacit\w*)?)",
        r"(?:round|rounded|circular) (?:densit\w*|opacit\w*)",
        r"lump",
        r"cavitary lesions?",
        r"carcinoma",
        r"neoplasm",
        r"tumou?rs?",
        r"metasta\w+",
    ),
    "Edema": (
        r"o?edema",
        r"heart failure",
        r"chf",
        r"(?:vascular|pulmonary|venous) congestion",
        r"vascular (?:prominence|indistinctness)",
        r"prominence of the (?:pulmonary )?vascular\w*",
        r"cephalization",
        r"kerley b?",
    ),
    "Consolidation": (r"consolidat(?:ion|ions|ive|ed)",),
    "Pneumonia": (r"pneumonias?", r"pneumonitis", r"infection", r"infectious(?: process)?", r"bronchopneumonia"),
    "Atelectasis": (
        r"atelecta\w+",
        r"(?:lobar|lung|segmental) collapse",
        r"collapse of (?:\w+ ){0,4}?(?:lobes?|lungs?)",
    ),
    "Pneumothorax": (r"pneumothora(?:x|ces)", r"hydropneumothorax", r"hemopneumothorax"),
    "Pleural Effusion": (
        r"effusions?",
        r"pleural fluid",
        r"hydrothorax",
        r"hydropneumothorax",
        r"hemothorax",
        r"hemopneumothorax",
    ),
    "Pleural Other": (
        r"pleural (?:thickening|scar\w*|plaques?|calcifications?|based (?:scar\w*|thickening))",
        r"pleuro ?parenchymal (?:scar\w*|thickening)",
        r"pleural peripheral (?:scar\w*|thickening)",
        r"fibrothorax",
        r"apical (?:pleural )?(?:cap|capping)",
        r"thickening of the pleura",
    ),
    "Fracture": (r"fractures?", r"fractured", r"fx"),
    "Support Devices": (
        rf"{_LINE_KINDS}(?: \w+){{0,2}} (?:line|lines|catheter|catheters)",
        r"catheters?",
        r"(?:pacemaker|pacer|defibrillator|aicd|icd)(?:s| leads?| wires?)?",
        r"(?:endotracheal|et|tracheostomy|nasogastric|ng|og|orogastric|feeding|enteric|chest|dobhoff|g) tubes?",
        r"tubes?",
        r"(?:sternotomy|median sternotomy|surgical|cerclage) (?:wires?|sutures?)",
        r"sternal (?:wires?|sutures?)",
        r"(?:surgical|vascular|postsurgical|cholecystectomy) clips?",
        r"clips",
        r"stents?",
        r"(?:prosthetic|mechanical|artificial) valves?",
        r"valve (?:replacement|prosthesis)",
        r"(?:port a cath|portacath|mediport|power port)",
        r"(?:orthopedic |surgical |spinal |fixation )?hardware",
        r"(?:devices?|apparatus|arthroplast\w*|coils?)",
        r"(?:fixation |surgical )?(?:plates?|screws?|rods?)",
        r"(?:pacemaker|pacer|monitor|monitoring|ekg|ecg|cardiac|external) leads?|leads",
        r"(?:pulse |battery )?generator",
        r"prosthes[ie]s|(?:bone )?anchors?|occluder|(?:ivc|caval) filter|closure device",
        r"sutures?|suture material",
        r"(?:distal )?tip (?:projects|projecting|overl\w+|terminat\w+|approximat\w+|extends|at|in|is)",
    ),
    OTHER: (
        r"emphysema\w*",
        r"copd",
        r"chronic obstructive",
        r"granulom\w*",
        r"calcifi\w+",
        r"(?:dextro|levo|rotary )?scolio\w*",
        r"foreign bod(?:y|ies)",
        r"kyphos\w+",
        r"degenerat\w+",
        r"spondylosis",
        r"osteophyt\w+",
        r"osteopenia",
        r"hyper ?(?:inflat\w+|expan\w+|lucen\w+)",
        r"flatten\w*",
        r"hernia",
        r"eventration",
        r"elevat\w+",
        r"blunt\w*",
        r"thicken\w*",
        r"tortu\w+",
        r"ectatic|ectasia",
        r"atherosclero\w+",
        r"deformit\w+",
        r"scar\w*",
        r"cicatri\w+",
        r"fibros\w+|fibrotic",
        r"bullae|bulla|bullous|blebs?",
        r"cysts?|cystic",
        r"bronchiectasis",
        r"(?:interstitial|bronchovascular|reticular|lung|pulmonary) markings",
        r"reticula\w+",
        r"interstitial (?:prominence|changes?|pattern|thickening)",
        r"pneumo(?:peritoneum|mediastinum)",
        r"hypoinflat\w+|low lung volumes?|(?:lung|pulmonary) volumes are low",
        r"volume loss",
        r"aspiration",
        r"contusion",
        r"hemorrhage|hematoma",
        r"lymphadenopathy",
        r"(?:post ?surgical|postoperative) changes?",
        r"mastectomy|lobectomy|pneumonectomy|sternotomy|thoracotomy|cabg",
    ),
}

# Structures whose description carries the finding: "heart size is normal" (0), "heart size is
# enlarged" (1), "stable cardiac silhouette" (-1). Positive only when a size word is nearby.
ANATOMY: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"cardio ?mediastin\w*(?: (?:silhouette|contours?|shadow|size|width))?",
        r"mediastin(?:um|al (?:silhouette|contours?|shadow|size|width|configuration))",
        r"(?:superior )?mediastinum",
    ),
    "Cardiomegaly": (
        rf"{_CARDIAC} (?:size|silhouette|shadow|contours?|diameter|dimension)",
        r"heart(?= [^.;]{0,30}\b(?:size|sized|enlarge\w*|large)\b)",
        r"cardiac(?= [^.;]{0,20}\b(?:enlarge\w*|large)\b)",
    ),
}

# Phrases that contain a mention but are not one, per observation ("pericardial effusion").
UNMENTIONS: dict[str, tuple[str, ...]] = {
    "Pleural Effusion": (r"pericardial effusions?",),
    "Lung Opacity": (
        r"(?:pleural|pleuro ?parenchymal|pleural peripheral) (?:opacit\w+ |densit\w+ )?(?:scar\w*|thickening|plaques?)",
        r"(?:soft tissue|breast|nipple|bone|bony|osseous) (?:densit\w+|opacit\w+)",
        r"(?:density|densities) (?:of|in) the (?:soft tissues?|bones?)",
        r"(?:calcified|granulomatous) (?:densit\w+|opacit\w+)",
        r"(?:nodular|round|rounded|circular|oval) (?:densit\w+|opacit\w+)",  # a lesion, not an opacity
    ),
    "Lung Lesion": (
        r"(?:soft tissue|breast|nipple|bone|bony|osseous) mass\w*",
        r"mass effect",
        r"(?:calcified|granulomatous) (?:nodules?|nodular densit\w+)",  # granulomas: Other, as CheXpert
    ),
    "Atelectasis": (r"vertebral (?:body )?collapse",),
    "Support Devices": (r"tube ?current",),
    "Pneumonia": (
        r"infectious disease",
        r"(?:(?:prior|previous|old|remote|healed) )?(?:granulomatous|tuberculous|tuberculosis|tb) infection",
        r"(?:prior|previous|old|remote|healed) infection",
    ),
}

# Mentions that are uncertain by themselves (CheXpert: congestion suggests, not shows, edema).
_INHERENTLY_UNCERTAIN = re.compile(r"congestion|prominence|indistinctness|cephalization")
# Heart failure mentioned (positive or uncertain) makes Cardiomegaly uncertain, as in CheXpert.
_HEART_FAILURE = re.compile(r"heart failure|chf")

_PSEUDO = re.compile(
    r"\b(?:no (?:significant |interval |substantial )?(?:change|increase|decrease|further|longer (?:any )?change)"
    r"|not only|no (?:acute )?(?:cardiopulmonary|osseous) (?:disease|abnormality|process) (?:but|with)"
    r"|without (?:change|difficulty))\b"
)

_PRE_NEG_UNCERTAIN = re.compile(
    r"\b(?:cannot|can not|can't|could not|difficult to|unable to) (?:be )?(?:exclude|excluded|rule out|ruled out)\b"
    r"|\bno new\b|\bno (?:evidence|definite evidence) to (?:exclude|rule out)\b|\brule out\b|\br/o\b"
)
_PRE_NEG = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|resolution of|resolved|clear(?:ing)? of"
    r"|removal of|removed|rather than|ruled out|history of|exclude[sd]?|interval clearing of|neither|nor|never)\b"
)
_PRE_UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|possibility|probable|probably|questionable|question of|questioned"
    r"|(?:evaluation|evaluate|assess\w*|search) (?:of|for)|suspect\w*|suspicious|suspicion|concern(?:ing)? for"
    r"|worrisome|may|maybe|might|could|can|would|suggest\w*|presum\w+|equivocal|indeterminate|differential"
    r"|versus|vs|consider|considered|consideration|cannot be|correlat\w+|uncertain|borderline|obscur\w+"
    r"|not (?:well|clearly) (?:seen|visualized|evaluated)|poorly (?:seen|visualized|evaluated))\b"
    r"|\?|\bor\s+(?:\S+\s+){0,2}$|\band/or\b"
)
_POST_WINDOW = r"^\W*(?:(?!but\b|however\b|although\b|which\b|and (?:there|the|it)\b)[\w/]+\W+){0,4}?"
_POST_NEG = re.compile(
    _POST_WINDOW
    + r"(?:(?:is|are|was|were|has been|have been|has|have|appears?|remains?|not)\s+)?"
    r"(?:not (?:seen|identified|present|demonstrated|evident|visualized|appreciated|noted|enlarged|widened"
    r"|definitely seen)"
    r"|no longer (?:seen|present|visualized|evident)|absent|resolved|cleared|removed|negative)\b"
)
_POST_UNCERTAIN = re.compile(
    _POST_WINDOW
    + r"(?:(?:is|are|was|were|has|have|appears?)\s+)?"
    r"(?:not (?:entirely |completely )?excluded|not ruled out|possible|suspected|questioned|questionable|less likely"
    r"|cannot be (?:entirely |completely )?(?:excluded|ruled out)|(?:may|might|could) be (?:present|seen|noted)"
    r"|(?:may|might|could) not be (?:demonstrated|seen|visible|visualized|detected)"
    r"|versus|vs|or\b|(?:would be |is )?(?:a |another )?consideration)"
)
_ANATOMY_NEG = re.compile(
    r"\b(?:normal|unremarkable|within normal limits|(?:is|are|appears?|remains?) normal|not (?:enlarged|widened|large)"
    r"|no (?:enlargement|widening)|negative|within (?:the )?(?:range of )?normal)\b"
)
_ANATOMY_BORDERLINE = re.compile(
    r"\b(?:borderline|upper (?:limits?|range) of normal|top(?: of)? normal|high normal|upper normal)\b"
)
_ANATOMY_UNCERTAIN = re.compile(
    r"\b(?:stable|unchanged|similar|obscured|not (?:well )?(?:seen|visualized|assessed|evaluated)"
    r"|difficult to (?:assess|evaluate)|mildly prominent|possibl\w+|may be|questionabl\w+)\b"
)
_ANATOMY_POSITIVE = re.compile(
    r"\b(?:enlarge\w*|large|widen\w*|wide|prominen\w+|increased|cardiomegaly|abnormal)\b"
)
_CLAUSE_BREAK = re.compile(
    r"\b(?:but|however|although|though|except|aside from|apart from|which|whereas|yet|otherwise"
    r"|with the exception of|and (?:there|the|it|a|an)|there (?:is|are))\b|[;:]"
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+|(?<=\s)(?=\d+\.\s)")


@dataclass(frozen=True)
class Mention:
    """One phrase found in a report, with its observation and its status (1, 0 or -1)."""

    observation: str
    phrase: str
    status: int


class Policy(str, Enum):
    """How uncertain (-1) labels become training targets (CheXpert paper, Irvin et al. 2019)."""

    U_ZERO = "u-zero"
    U_ONES = "u-ones"
    U_IGNORE = "u-ignore"


def _compile(patterns: Sequence[str]) -> re.Pattern[str]:
    """One alternation with word boundaries around every phrase."""
    return re.compile(r"\b(?:" + "|".join(f"(?:{p})" for p in patterns) + r")\b")


_FINDING_RE = {obs: _compile(p) for obs, p in FINDINGS.items()}
_ANATOMY_RE = {obs: _compile(p) for obs, p in ANATOMY.items()}
_UNMENTION_RE = {obs: _compile(p) for obs, p in UNMENTIONS.items()}


def normalise(text: str) -> str:
    """Lower-case, drop XXXX anonymisation tokens and hyphens, squeeze spaces."""
    text = re.sub(r"x-xxxx", "x-ray", text, flags=re.IGNORECASE)
    text = re.sub(r"\bX{2,}\b", " ", text, flags=re.IGNORECASE)
    text = text.lower().replace("-", " ")
    return re.sub(r"[ \t]+", " ", text)


def _sentences(text: str) -> list[str]:
    """Sentences (and numbered list items) of an already normalised text."""
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def _clause_before(sentence: str, start: int) -> str:
    """The text from the last clause break before ``start`` up to ``start``."""
    before = sentence[:start]
    breaks = list(_CLAUSE_BREAK.finditer(before))
    return before[breaks[-1].end():] if breaks else before


def _clause_after(sentence: str, end: int) -> str:
    """The text from ``end`` up to the next clause break or comma."""
    after = sentence[end:]
    stop = re.search(_CLAUSE_BREAK.pattern + r"|,", after)
    return after[: stop.start()] if stop else after


def _finding_status(pre: str, post: str, inside: str) -> int:
    """Status of a finding mention from its clause: pre-negation uncertainty, negation, uncertainty."""
    pre = _PSEUDO.sub(" ", pre)
    if _PRE_NEG_UNCERTAIN.search(pre):
        return UNCERTAIN
    if _PRE_NEG.search(pre) or _POST_NEG.search(post) or re.search(r"\bnot\b", inside):
        return NEGATIVE
    if _PRE_UNCERTAIN.search(pre) or _POST_UNCERTAIN.search(post) or _INHERENTLY_UNCERTAIN.search(inside):
        return UNCERTAIN
    return POSITIVE


def _anatomy_status(pre: str, post: str) -> int | None:
    """Status of an anatomy mention; None when the clause says nothing about its size."""
    near = pre[-25:] + " " + post
    if _PRE_NEG_UNCERTAIN.search(pre) or _ANATOMY_BORDERLINE.search(near):
        return UNCERTAIN
    said_normal = _ANATOMY_NEG.search(near) and not _ANATOMY_POSITIVE.search(_ANATOMY_NEG.sub(" ", near))
    if _PRE_NEG.search(_PSEUDO.sub(" ", pre)) or said_normal:
        return NEGATIVE
    if _ANATOMY_UNCERTAIN.search(near) or _PRE_UNCERTAIN.search(pre):
        return UNCERTAIN
    if _ANATOMY_POSITIVE.search(near):
        return POSITIVE
    return None


def _sentence_mentions(sentence: str) -> list[Mention]:
    """Classified mentions of one normalised sentence."""
    blocked = {obs: [m.span() for m in p.finditer(sentence)] for obs, p in _UNMENTION_RE.items()}

    def free(obs: str, span: tuple[int, int]) -> bool:
        return not any(s < span[1] and span[0] < e for s, e in blocked.get(obs, ()))

    found: list[Mention] = []
    for obs, pattern in _FINDING_RE.items():
        for m in pattern.finditer(sentence):
            if free(obs, m.span()):
                pre, post = _clause_before(sentence, m.start()), _clause_after(sentence, m.end())
                found.append(Mention(obs, m.group(0), _finding_status(pre, post, m.group(0))))
    for obs, pattern in _ANATOMY_RE.items():
        for m in pattern.finditer(sentence):
            status = _anatomy_status(_clause_before(sentence, m.start()), _clause_after(sentence, m.end()))
            if status is not None and free(obs, m.span()):
                found.append(Mention(obs, m.group(0), status))
    return found


def find_mentions(text: str) -> list[Mention]:
    """All classified mentions in a report text (Findings + Impression, any length)."""
    if not isinstance(text, str):
        raise ModelError(f"report text must be a string, got {type(text).__name__}")
    return [m for s in _sentences(normalise(text)) for m in _sentence_mentions(s)]


def aggregate(mentions: Sequence[Mention]) -> tuple[int | None, ...]:
    """CheXpert aggregation: positive > uncertain > negative per observation; No Finding rule."""
    best: dict[str, int] = {}
    rank = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}
    implied = [
        Mention("Cardiomegaly", m.phrase, UNCERTAIN)
        for m in mentions
        if m.observation == "Edema" and m.status != NEGATIVE and _HEART_FAILURE.fullmatch(m.phrase)
    ]
    for m in [*mentions, *implied]:
        if m.observation not in best or rank[m.status] > rank[best[m.observation]]:
            best[m.observation] = m.status
    abnormal = any(
        status in (POSITIVE, UNCERTAIN) for obs, status in best.items() if obs not in (SUPPORT_DEVICES, NO_FINDING)
    )
    no_finding = None if abnormal else POSITIVE
    return tuple(no_finding if obs == NO_FINDING else best.get(obs) for obs in OBSERVATIONS)


def label_report(text: str) -> tuple[int | None, ...]:
    """Raw labels (1 / 0 / -1 / None) of a report text, in OBSERVATIONS order."""
    return aggregate(find_mentions(text))


def label_dict(text: str) -> dict[str, int | None]:
    """Raw labels of a report text keyed by observation name."""
    return dict(zip(OBSERVATIONS, label_report(text)))


def as_policy(policy: Policy | str) -> Policy:
    """Turn a policy name ("u-zero", "u-ones", "u-ignore") into a Policy, naming a bad value."""
    try:
        return Policy(policy)
    except ValueError:
        names = ", ".join(p.value for p in Policy)
        raise ModelError(f"unknown uncertainty policy {policy!r}; choose one of {names}") from None


def apply_policy(raw: Sequence[int | None], policy: Policy | str = Policy.U_ZERO) -> tuple[int, ...]:
    """Training targets from raw labels: None -> 0; -1 -> 0 (U-Zero), 1 (U-Ones) or -1 (U-Ignore)."""
    chosen = as_policy(policy)
    uncertain_to = {Policy.U_ZERO: 0, Policy.U_ONES: 1, Policy.U_IGNORE: -1}[chosen]
    out = []
    for value in raw:
        if value not in (None, POSITIVE, NEGATIVE, UNCERTAIN):
            raise ModelError(f"raw label must be 1, 0, -1 or None, got {value!r}")
        out.append(0 if value is None else uncertain_to if value == UNCERTAIN else int(value))
    return tuple(out)


def report_labels(text: str, policy: Policy | str = Policy.U_ZERO) -> tuple[int, ...]:
    """Training targets of a report text under an uncertainty policy."""
    return apply_policy(label_report(text), policy)
