"""C-FIND response identifiers: the requested keys, filled from the values the catalog answers with."""
from __future__ import annotations

from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

RESPONSE_CHARSET = "ISO_IR 192"  # the catalog holds decoded text; answer in UTF-8


def response(request: Dataset, level: str, values: dict[str, Any], retrieve_ae: str) -> Dataset:
    """Every key the request named, with the held value or empty; plus level, charset and where to retrieve."""
    identifier = Dataset()
    identifier.SpecificCharacterSet = RESPONSE_CHARSET
    identifier.QueryRetrieveLevel = level
    for element in request:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        value = values.get(keyword)
        if value in (None, ""):
            identifier[element.tag] = DataElement(element.tag, element.VR, None)
        else:
            setattr(identifier, keyword, value)
    identifier.RetrieveAETitle = retrieve_ae
    return identifier
