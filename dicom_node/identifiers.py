"""C-FIND response identifiers: the requested keys, filled from the values the catalog answers with.

Text values are encoded here, once, as the bytes they are sent as (UTF-8, the response character set, padded to
an even length) and kept as raw elements: setting them as pydicom values would convert and validate each one and
then encode it again, the larger part of an answer's cost. Text bytes are the same in every uncompressed transfer
syntax. Keys of other value representations (numbers, sequences) are set as pydicom values.

`encode_identifier` writes an answer of raw text elements itself, in either little endian syntax: the same
bytes as pydicom's writer, which spends ~8 us of CPU per element (~0.12-0.15 ms per similar-case answer, timed in
process) checking and dispatching what is already encoded. It leaves any other answer to pydicom, declared in
the syntax it is written in, so that pydicom too writes the raw elements as they are.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, cast

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import AMBIGUOUS_VR, STR_VR
from pynetdicom.dsutils import encode

RESPONSE_CHARSET = "ISO_IR 192"  # the catalog holds decoded text; answer in UTF-8
_ENCODINGS = convert_encodings(RESPONSE_CHARSET)
Element = DataElement | RawDataElement
_CHARSET, _LEVEL, _RETRIEVE_AE = Tag("SpecificCharacterSet"), Tag("QueryRetrieveLevel"), Tag("RetrieveAETitle")


def text_element(tag: int, vr: str, value: str | int | Iterable[str | int] | None) -> RawDataElement:
    """An element of a text VR from its value (several values as a list; None or "" for empty), as sent."""
    if value is None or value == "":
        data = b""
    else:
        text = str(value) if isinstance(value, (str, int)) else "\\".join(map(str, value))
        data = text.encode("utf-8")
        if len(data) % 2:
            data += b"\x00" if vr == "UI" else b" "
    return RawDataElement(BaseTag(tag), vr, len(data), data, 0, True, True)


_CHARSET_ELEMENT = text_element(_CHARSET, "CS", RESPONSE_CHARSET)


def answer_dataset(elements: Iterable[Element]) -> Dataset:
    """A dataset of ``elements`` (the raw ones from `text_element`), encoded in the response character set.
    With an element whose VR depends on other attributes ("US or SS") no encoding is declared: pydicom then
    resolves it as it writes."""
    by_tag = {element.tag: element for element in elements}
    identifier = Dataset(by_tag)
    if not any(element.VR in AMBIGUOUS_VR for element in by_tag.values() if not element.is_raw):
        identifier.set_original_encoding(True, True, _ENCODINGS)
    return identifier


def _declared(identifier: Dataset, syntax: UID) -> Dataset:
    """``identifier`` (from `answer_dataset`) declared in the uncompressed transfer ``syntax`` it is about to be
    written in (its raw elements are text, the same bytes in every uncompressed syntax), so that pydicom writes
    them without converting them first."""
    if identifier.original_encoding != (None, None):
        identifier.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, _ENCODINGS)
    return identifier


# Explicit VR: the VRs whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2); the others take 2.
_LONG_LENGTH_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))


def encode_identifier(identifier: Dataset, syntax: UID) -> bytes:
    """``identifier`` as sent on a presentation context of transfer ``syntax``. An answer of `response` (its text
    in the response character set) whose elements are all raw text, in a little endian syntax, not deflated:
    written here, element by element in tag order. Otherwise by pydicom (pynetdicom's `encode`, as its C-FIND
    service would), which also leaves out group lengths; ValueError when that fails."""
    if syntax.is_little_endian and not syntax.is_deflated and identifier.get_item(_CHARSET) == _CHARSET_ELEMENT:
        implicit = syntax.is_implicit_VR
        parts = []
        for element in identifier.elements():
            if not element.is_raw or element.VR not in STR_VR or element.tag & 0xFFFF == 0:
                break
            group, number, value = element.tag >> 16, element.tag & 0xFFFF, cast(bytes, element.value)
            if implicit:
                parts.append(struct.pack("<HHL", group, number, len(value)))
            elif element.VR in _LONG_LENGTH_VRS:
                parts.append(struct.pack("<HH2s2xL", group, number, element.VR.encode(), len(value)))
            elif len(value) <= 0xFFFF:
                parts.append(struct.pack("<HH2sH", group, number, element.VR.encode(), len(value)))
            else:  # too long for its VR: pydicom says so
                break
            parts.append(value)
        else:
            return b"".join(parts)
    encoded = encode(_declared(identifier, syntax), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise ValueError("an answer identifier could not be encoded (pydicom's error is logged above)")
    return encoded


def response(request: Dataset, level: str, values: dict[str, Any], retrieve_ae: str,
             extra: Iterable[Element] = ()) -> Dataset:
    """Every key the request named, with the held value or empty; plus level, charset, where to retrieve and
    the ``extra`` elements given, which take the place of a requested key of the same tag."""
    elements = [_CHARSET_ELEMENT, text_element(_LEVEL, "CS", level),
                text_element(_RETRIEVE_AE, "AE", retrieve_ae)]
    for element in request:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"):
            continue
        value = values.get(keyword)
        if element.VR in STR_VR:
            elements.append(text_element(element.tag, element.VR, value))
        else:
            elements.append(DataElement(element.tag, element.VR, None if value in (None, "") else value))
    return answer_dataset([*elements, *extra])


def private_tag(group: int, offset: int) -> BaseTag:
    """The tag of element ``offset`` of the first private block of ``group``, (gggg,10xx): the one block an
    answer has, reserved by `private_creator`."""
    return Tag(group, 0x1000 + offset)


def private_creator(group: int, creator: str) -> RawDataElement:
    """The element reserving the first private block of ``group`` for ``creator`` (gggg,0010)."""
    return text_element(Tag(group, 0x0010), "LO", creator)
