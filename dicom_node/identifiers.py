"""C-FIND response identifiers: the requested keys, filled from the values the catalog answers with.

Text values are encoded here, once, as the bytes they are sent as (UTF-8, the response character set, padded to
an even length) and kept as raw elements, which pydicom writes as they are: setting them as pydicom values
would convert and validate each one and then encode it again, the larger part of an answer's cost. Text bytes
are the same in every uncompressed transfer syntax; `answer_dataset` declares Implicit VR Little Endian and
`for_syntax` restates that for the presentation context an answer goes out on, so pydicom takes the raw
path there too. Keys of other value representations (numbers, sequences) are set as pydicom values.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import AMBIGUOUS_VR, STR_VR

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


def answer_dataset(elements: Iterable[Element]) -> Dataset:
    """A dataset of ``elements`` (the raw ones from `text_element`), encoded in the response character set.
    With an element whose VR depends on other attributes ("US or SS") no encoding is declared: pydicom then
    resolves it as it writes."""
    by_tag = {element.tag: element for element in elements}
    identifier = Dataset(by_tag)
    if not any(element.VR in AMBIGUOUS_VR for element in by_tag.values() if not element.is_raw):
        identifier.set_original_encoding(True, True, _ENCODINGS)
    return identifier


def for_syntax(identifier: Dataset, syntax: UID) -> Dataset:
    """``identifier`` (from `answer_dataset`) declared in the uncompressed transfer ``syntax`` it is about to be
    written in (its raw elements are text, the same bytes in every uncompressed syntax), so that pydicom writes
    them without converting them first."""
    if identifier.original_encoding != (None, None):
        identifier.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, _ENCODINGS)
    return identifier


def response(request: Dataset, level: str, values: dict[str, Any], retrieve_ae: str,
             extra: Iterable[Element] = ()) -> Dataset:
    """Every key the request named, with the held value or empty; plus level, charset, where to retrieve and
    the ``extra`` elements given, which take the place of a requested key of the same tag."""
    elements = [text_element(_CHARSET, "CS", RESPONSE_CHARSET), text_element(_LEVEL, "CS", level),
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
