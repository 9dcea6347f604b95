"""The HTTP answer to each error of the node, for every web route (pages, their API, DICOMweb): one table."""
from __future__ import annotations

from dataclasses import dataclass

from dicom_node.errors import NodeError
from dicom_node.reference_sheet import SheetError, SheetsDisabledError
from dicom_node.similar import IndexLoadingError, NotIndexedError, UnknownStudyError
from dicom_node.web.instances import FrameError

RETRY_AFTER_S = "1"  # the Retry-After of every 503: a study about to be indexed, the index loading after a start


@dataclass(frozen=True)
class HttpError:
    status: int
    title: str
    dicomweb_status: int | None = None  # where DICOMweb answers otherwise (None: as ``status``)

    @property
    def dicomweb(self) -> int:
        return self.status if self.dicomweb_status is None else self.dicomweb_status


# Looked up along the error's classes, most specific first (``http_error``).
HTTP_ERRORS: dict[type[NodeError], HttpError] = {
    UnknownStudyError: HttpError(404, "Unknown study"),
    # DICOMweb clients retry a 503 after its Retry-After; the page says what is going on.
    NotIndexedError: HttpError(409, "Study not indexed yet", dicomweb_status=503),
    IndexLoadingError: HttpError(503, "Similarity index loading"),  # with Retry-After, pages and DICOMweb alike
    SheetsDisabledError: HttpError(403, "Reference sheets disabled"),
    SheetError: HttpError(422, "No reference sheet"),
    FrameError: HttpError(404, "No such frame"),
    NodeError: HttpError(400, "Bad request"),
}


def http_error(error: NodeError) -> HttpError:
    return next(HTTP_ERRORS[kind] for kind in type(error).__mro__ if kind in HTTP_ERRORS)
