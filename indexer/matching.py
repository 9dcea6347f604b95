"""Study Root C-FIND matching over the catalog's tables (PS3.4 C.2.2.2), for C-FIND, C-MOVE, C-GET and QIDO.

Keys are keyword: value strings, a list of values joined by backslashes (``dicom_node.matching`` reads them
from a request). Supported per key of QUERY_KEYS: universal (empty or *), single value, wildcard (* and ?),
UID list and date/time range (A-B, -B, A-); and ModalitiesInStudy, a list of modalities. Keys below the
query level are ignored. A single value matches as the database compares (exactly). A wildcard matches case
included (`WildcardMatch`, PS3.4 C.2.2.2.4), except in a person's name (PN, where the standard leaves it to the
implementation), where it ignores case (ILIKE).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, bindparam, select, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.visitors import InternalTraversal

from indexer.schema import QUERY_KEYS, Instance, QueryKey, Series, Study, keys_down_to

MODEL_OF_LEVEL = {"STUDY": Study, "SERIES": Series, "IMAGE": Instance}


def column(keyword: str) -> InstrumentedAttribute[Any]:
    key = QUERY_KEYS[keyword]
    return getattr(MODEL_OF_LEVEL[key.level], key.column)


def _like(pattern: str) -> str:
    """A DICOM wildcard pattern as a LIKE pattern escaped with a backslash."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


class WildcardMatch(ColumnElement[bool]):
    """``column`` matches the DICOM wildcard ``pattern`` (``*`` any run of characters, ``?`` any one), case included.

    SQL LIKE where it is case-sensitive (PostgreSQL); GLOB in SQLite, whose LIKE ignores ASCII case and so cannot
    use the column's index: it read the whole table (~170 ms a query at 100k studies). GLOB is answered from the
    index when the pattern starts with a literal (a prefix of a patient ID or an accession number). Both patterns
    are bound parameters, so that a statement with a wildcard is compiled once and cached like any other."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement),
                           ("like", InternalTraversal.dp_clauseelement),
                           ("glob", InternalTraversal.dp_clauseelement)]
    # No Boolean type: in a WHERE clause SQLite would get it compared with 1 ("... GLOB ? = 1"), which no index
    # answers.

    def __init__(self, column: InstrumentedAttribute[Any], pattern: str) -> None:
        self.column = column.expression
        self.like = bindparam(None, _like(pattern), unique=True)
        # GLOB's wildcards are DICOM's; "[" opens a character class in GLOB and is matched as itself through one.
        self.glob = bindparam(None, pattern.replace("[", "[[]"), unique=True)

    @property
    def _from_objects(self) -> list[Any]:
        return self.column._from_objects


@compiles(WildcardMatch)
def _compile_like(match: WildcardMatch, compiler: Any, **kw: Any) -> str:
    return compiler.process(match.column.like(match.like, escape="\\"), **kw)


@compiles(WildcardMatch, "sqlite")
def _compile_glob(match: WildcardMatch, compiler: Any, **kw: Any) -> str:
    return compiler.process(match.column.op("GLOB", is_comparison=True)(match.glob), **kw)


def _condition(key: QueryKey, attribute: InstrumentedAttribute[Any], value: str) -> Any:
    if key.kind == "uid":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if not uids:  # separators only: no UID named, matched as a zero-length (universal) key
            return true()
        return attribute.in_(uids) if len(uids) > 1 else attribute == uids[0]
    if key.kind in ("date", "time") and "-" in value:
        low, _, high = value.partition("-")
        low, high = low.strip().replace(":", ""), high.strip().replace(":", "")
        if key.kind == "time" and high:
            high = high.ljust(6, "9")  # 1200 matches up to 120099.999...
        parts = ([attribute >= low] if low else []) + ([attribute <= high] if high else [])
        return and_(*parts)
    if "*" in value or "?" in value:
        return attribute.ilike(_like(value), escape="\\") if key.kind == "name" else WildcardMatch(attribute, value)
    return attribute == value


def build_query(keys: Mapping[str, str], level: str) -> Select[Any]:
    """A SELECT of the rows at ``level`` that match every key at or above it, in the order they were
    recorded: each row's primary key as ``pk``, then the value of every key at or above ``level``,
    labelled by its keyword."""
    model = MODEL_OF_LEVEL[level]
    held = keys_down_to(level)
    stmt = select(model.id.label("pk"), *(column(keyword).label(keyword) for keyword in held)).select_from(model)
    if level == "SERIES":
        stmt = stmt.join(Study, Series.study_pk == Study.id)
    elif level == "IMAGE":
        stmt = stmt.join(Series, Instance.series_pk == Series.id).join(Study, Series.study_pk == Study.id)
    for keyword in held:
        value = keys.get(keyword, "")
        if value and value != "*":
            stmt = stmt.where(_condition(QUERY_KEYS[keyword], column(keyword), value))
    modalities = keys.get("ModalitiesInStudy", "")
    if modalities and modalities != "*":
        wanted = [m for m in modalities.split("\\") if m]
        stmt = stmt.where(
            (Study.id if level == "STUDY" else Series.study_pk).in_(select(Series.study_pk).where(Series.modality.in_(wanted)))
        )
    return stmt.order_by(model.id)


def instances_query(keys: Mapping[str, str], level: str) -> Select[Any]:
    """(SOP Instance UID, path, SOP Class UID, transfer syntax) of every instance under the rows at ``level``
    that ``keys`` match, series by series."""
    matched = build_query(keys, level).with_only_columns(MODEL_OF_LEVEL[level].id).order_by(None)
    stmt = select(Instance.sop_uid, Instance.path, Instance.sop_class_uid, Instance.transfer_syntax).join(
        Series, Instance.series_pk == Series.id
    )
    if level == "STUDY":
        stmt = stmt.where(Series.study_pk.in_(matched))
    elif level == "SERIES":
        stmt = stmt.where(Series.id.in_(matched))
    else:
        stmt = stmt.where(Instance.id.in_(matched))
    return stmt.order_by(Series.id, Instance.id)
