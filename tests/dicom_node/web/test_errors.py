"""The one table of HTTP answers to the node's errors: the page and its API, and DICOMweb where it differs."""
from __future__ import annotations

import pytest

from dicom_node.errors import NodeError
from dicom_node.reference_sheet import NoSimilarCaseError, SheetsDisabledError
from dicom_node.similar import NotIndexedError, UnknownStudyError
from dicom_node.web import dicomweb
from dicom_node.web.errors import http_error
from dicom_node.web.instances import FrameError


@pytest.mark.parametrize(("error", "page", "dicomweb_status"), [
    (UnknownStudyError("1.2.3"), 404, 404),
    (NotIndexedError("1.2.3"), 409, 503),
    (SheetsDisabledError(), 403, 403),
    (NoSimilarCaseError("1.2.3"), 422, 422),  # a SheetError
    (FrameError(2, 1), 404, 404),
    (NodeError("bad UID"), 400, 400),
])
def test_each_error_has_its_answer(error: NodeError, page: int, dicomweb_status: int) -> None:
    assert http_error(error).status == page
    answer = dicomweb._error(None, error)  # type: ignore[arg-type]  # the request is not used
    assert answer.status_code == dicomweb_status and answer.body.decode() == str(error)
    assert answer.headers.get("Retry-After") == ("1" if dicomweb_status == 503 else None)
