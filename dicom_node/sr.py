"""Report text from a DICOM Structured Report's content tree (Basic Text, Enhanced, Comprehensive SR)."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

from pydicom.dataset import Dataset

# Concept codes (value, scheme) naming the sections a report's findings and impression live in.
FINDINGS_CODES = {("59776-5", "LN"), ("121070", "DCM"), ("121071", "DCM"), ("18782-3", "LN")}
IMPRESSION_CODES = {("19005-8", "LN"), ("121072", "DCM"), ("121073", "DCM"), ("121076", "DCM")}
WANTED_MEANINGS = {"findings", "finding", "impression", "impressions", "conclusion", "conclusions"}
# Sections that are not about what the image shows; left out when no Findings/Impression exists.
CONTEXT_CODES = {("11329-0", "LN"), ("18785-6", "LN"), ("121109", "DCM"), ("18834-2", "LN"),
                 ("55111-9", "LN"), ("121064", "DCM"), ("121060", "DCM"), ("121065", "DCM")}


def _concept(item: Dataset) -> tuple[str, str, str]:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return "", "", ""
    code = seq[0]
    return str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeMeaning", ""))


def _is_wanted(item: Dataset) -> bool:
    value, scheme, meaning = _concept(item)
    return (value, scheme) in FINDINGS_CODES | IMPRESSION_CODES or meaning.strip().lower() in WANTED_MEANINGS


def _is_context(item: Dataset) -> bool:
    value, scheme, _ = _concept(item)
    return (value, scheme) in CONTEXT_CODES


def _texts(items: Dataset | None, wanted: bool, skip_context: bool) -> Iterator[tuple[bool, str]]:
    """(inside a wanted section, text) for every TEXT item of the tree, in document order."""
    for item in items or []:
        inside = wanted or _is_wanted(item)
        if skip_context and _is_context(item):
            continue
        if item.get("ValueType") == "TEXT" and str(item.get("TextValue", "")).strip():
            yield inside, str(item.TextValue).strip()
        yield from _texts(item.get("ContentSequence"), inside, skip_context)


def report_text(ds: Dataset) -> str:
    """Findings and Impression text; when the report has neither section, all its non-context text."""
    found = list(_texts(ds.get("ContentSequence"), _is_wanted(ds), skip_context=True))
    chosen = [text for inside, text in found if inside] or [text for _, text in found]
    return "\n".join(chosen)


def report_time(ds: Dataset) -> str:
    """YYYYMMDDHHMMSS(.ffffff) of the report content, for ordering amendments; now when absent."""
    for date_kw, time_kw in (("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime")):
        date = str(ds.get(date_kw, "") or "").strip()
        if date:
            time = str(ds.get(time_kw, "") or "").strip().replace(":", "")
            return f"{date}{time.ljust(6, '0')}"
    return datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S.%f")
