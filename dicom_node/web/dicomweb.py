"""A read-only DICOMweb front end (PS3.18) over the node's catalog and store, for web viewers such as OHIF.

Two roots:
- ``/dicomweb``: the archive. QIDO-RS study, series and instance search (the C-FIND matcher of
  ``indexer.matching``: single value, wildcard, UID list, date/time range; no fuzzy matching),
  WADO-RS retrieve of instances (Part 10), metadata (DICOM JSON), frames, rendered and thumbnail images.
- ``/dicomweb-similar``: the same resources, except that ``GET /studies`` is the similar-case search:
  ``StudyInstanceUID`` or ``AccessionNumber`` names the query study; the answers are its most similar
  other studies, best first, ``StudyDescription`` reading ``#1 sim 0.93: Cardiomegaly`` as over DIMSE,
  the private MMDL block carrying score, rank and findings. A separate root (rather than a non-standard
  ``similar-to`` parameter) because a DICOMweb client is configured with roots and sends standard keys:
  any QIDO client can ask it. (OHIF's study list cannot name the query study; OHIF shows a similar pair
  by the two Study Instance UIDs in its viewer URL, served from the archive root.)
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, UID
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from dicom_node.errors import NodeError
from dicom_node.handlers import Services
from dicom_node.identifiers import response
from dicom_node.matching import matching_keys
from dicom_node.retrieve import Stored
from dicom_node.similar import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    TOP_K,
    similar_responses,
)
from dicom_node.sop_classes import IMAGE_STORAGE
from dicom_node.storage import check_uid
from dicom_node.web import instances
from dicom_node.web.errors import RETRY_AFTER_S, http_error
from dicom_node.web.media import (
    ANY_SYNTAX,
    OCTET_STREAM,
    MediaRange,
    Part,
    choose,
    frame_media_type,
    multipart_body,
    multipart_type,
    multipart_wishes,
    parse_accept,
)
from dicom_node.web.render import Renderer, jpeg_bytes
from indexer.schema import LEVELS, keys_down_to

LOG = logging.getLogger(__name__)

ARCHIVE_ROOT = "/dicomweb"
SIMILAR_ROOT = "/dicomweb-similar"
DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
MAX_RESULTS = 1000  # a QIDO answer holds at most this many matches; the client pages on with offset
MAX_RENDERED = 4096  # longest side of a rendered image, in pixels
THUMBNAIL_SIZE = 256
WARN_AGENT = "mmdl-node"
# PS3.18 Tables 6.7.1-2a..2c: what a search returns without includefield (plus StudyDescription, which
# viewers list and which carries the similar-case rank and score).
DEFAULT_KEYS = {
    "STUDY": ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
              "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceNumber"),
}
SUMMARY_KEYS = ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SIMILAR_KEYS = ("StudyInstanceUID", "AccessionNumber")


class DicomWebError(Exception):
    """An answer other than 200, with the reason a client sees (the node's own errors: ``web.errors``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _not_found(what: str) -> DicomWebError:
    return DicomWebError(404, f"no such {what} here")


@dataclass
class Query:
    """A QIDO request read into a C-FIND identifier plus paging and warnings."""

    identifier: Dataset
    limit: int | None = None
    offset: int = 0
    matching: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _keyword(name: str) -> str:
    """The DICOM keyword of a QIDO attribute given as keyword or as 8 hex digits (400 otherwise)."""
    if "." in name:
        raise DicomWebError(400, f"sequence matching ({name}) is not supported")
    tag = Tag(int(name, 16)) if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name) \
        else tag_for_keyword(name)
    keyword = keyword_for_tag(tag) if tag is not None else ""
    if not keyword:
        raise DicomWebError(400, f"unknown query parameter or attribute: {name}")
    return keyword


def _count(name: str, value: str) -> int:
    if not value.isdigit():
        raise DicomWebError(400, f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _element(keyword: str, value: str | None) -> DataElement:
    tag = tag_for_keyword(keyword)
    return DataElement(tag, dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE)


def parse_query(params: QueryParams, level: str, fixed: dict[str, str]) -> Query:
    """QIDO query parameters (PS3.18 8.3.4) as a C-FIND identifier at ``level``; ``fixed`` are the UIDs of
    the resource path. Bad parameters raise DicomWebError(400)."""
    held = keys_down_to(level)
    returned: list[str] = list(DEFAULT_KEYS[level])
    query = Query(Dataset())
    values: dict[str, list[str]] = {}
    for name, value in params.multi_items():
        if name == "limit":
            query.limit = _count(name, value)
        elif name == "offset":
            query.offset = _count(name, value)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise DicomWebError(400, f"fuzzymatching must be true or false, got {value!r}")
            if value == "true":
                query.warnings.append("The fuzzymatching parameter is not supported. "
                                      "Only literal matching has been performed.")
        elif name in ("accept", "charset"):
            continue  # content negotiation (see _accept), not a query key
        elif name == "includefield":
            for item in filter(None, (v.strip() for v in value.split(","))):
                if item == "all":
                    returned += held
                    returned += list(SUMMARY_KEYS) if level == "STUDY" else []
                else:
                    returned.append(_keyword(item))
        else:
            values.setdefault(_keyword(name), []).append(value)
    for keyword, given in values.items():
        joined = "\\".join(v.replace(",", "\\") if dictionary_VR(tag_for_keyword(keyword)) == "UI" else v
                           for v in given)
        matchable = keyword == "ModalitiesInStudy" or keyword in held
        if joined and not matchable:
            query.warnings.append(f"{keyword} is not supported for matching at this level and was ignored")
        elif joined:
            query.matching[keyword] = joined
    query.matching.update(fixed)
    query.identifier.QueryRetrieveLevel = level
    for keyword in dict.fromkeys([*returned, *query.matching]):
        query.identifier.add(_element(keyword, query.matching.get(keyword)))
    return query


def _uid(value: str, name: str) -> str:
    try:
        return check_uid(value, name)
    except NodeError as error:
        raise DicomWebError(400, str(error)) from None


def _warning(texts: list[str]) -> dict[str, str]:
    return {"Warning": ", ".join(f'299 {WARN_AGENT} "{t}"' for t in texts)} if texts else {}


def _accept(request: Request) -> list[MediaRange]:
    """The acceptable media types: the ``accept`` query parameter, which PS3.18 8.3.3.1 puts before the
    Accept header (browsers cannot set headers on an <img>), else the header."""
    return parse_accept(request.query_params.get("accept") or request.headers.get("accept", ""))


def _dicom_json(request: Request, body: list[dict[str, Any]], warnings: list[str] | None = None) -> Response:
    if choose(_accept(request), [DICOM_JSON, "application/json"]) is None:
        raise DicomWebError(406, f"this resource is offered as {DICOM_JSON}")
    return JSONResponse(body, media_type=DICOM_JSON, headers=_warning(warnings or []))


def _root(request: Request) -> str:
    """This DICOMweb root's absolute URL as the client addressed it (for RetrieveURL and BulkDataURI)."""
    return f"{request.url.scheme}://{request.url.netloc}{request.scope['root_path']}"


def _retrieve_url(root: str, identifier: Dataset, level: str) -> str:
    url = f"{root}/studies/{identifier.StudyInstanceUID}"
    if level != "STUDY":
        url += f"/series/{identifier.SeriesInstanceUID}"
    if level == "IMAGE":
        url += f"/instances/{identifier.SOPInstanceUID}"
    return url


def _to_json(identifier: Dataset, root: str, level: str) -> dict[str, Any]:
    del identifier.QueryRetrieveLevel
    if "StudyInstanceUID" in identifier and (level == "STUDY" or "SeriesInstanceUID" in identifier):
        identifier.RetrieveURL = _retrieve_url(root, identifier, level)
    return identifier.to_json_dict()


class DicomWeb:
    """The endpoints of both roots, bound to the node's services and the thumbnail renderer."""

    def __init__(self, services: Services, renderer: Renderer) -> None:
        self.services = services
        self.renderer = renderer

    # -- QIDO-RS ----------------------------------------------------------------------------------
    def search(self, level: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            fixed = {k: _uid(request.path_params[p], k) for p, k in (("study", "StudyInstanceUID"),
                                                                  ("series", "SeriesInstanceUID"))
                     if p in request.path_params}
            if fixed:
                self._instances(fixed, "STUDY" if "SeriesInstanceUID" not in fixed else "SERIES")  # 404 if unknown
            query = parse_query(request.query_params, level, fixed)
            limit = min(query.limit if query.limit is not None else MAX_RESULTS, MAX_RESULTS)
            root = _root(request)
            retrieve_ae = self.services.settings.node.ae_title
            matches = list(self.services.catalog.matches(matching_keys(query.identifier), level, limit + 1,
                                                          query.offset))
            if len(matches) > limit:
                query.warnings.append("There are additional results that can be requested")
            answers = [_to_json(response(query.identifier, level, values, retrieve_ae), root, level)
                       for values in matches[:limit]]
            return _dicom_json(request, answers, query.warnings)

        return endpoint

    def search_similar(self, request: Request) -> Response:
        """The similar-case search: the top-k other studies of the one named, ranked (similar.py's answers)."""
        query = parse_query(request.query_params, "STUDY", {})
        others = sorted(set(query.matching) - set(SIMILAR_KEYS))
        if others:
            raise DicomWebError(400, f"the similar-case search takes {' or '.join(SIMILAR_KEYS)} only, "
                                     f"not {', '.join(others)}")
        defaults = self.services.settings.query
        if query.limit is not None or query.offset:
            wanted = (query.limit if query.limit is not None else defaults.top_k) + query.offset
            if wanted > defaults.max_top_k:
                query.warnings.append(f"at most {defaults.max_top_k} similar studies are answered")
            block = query.identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
            block.add_new(TOP_K, "IS", str(max(1, min(wanted, defaults.max_top_k))))
        answers = similar_responses(self.services.catalog, self.services.index, query.identifier, defaults,
                                    self.services.settings.node.similar_ae_title, self.services.calibration)
        root = _root(request).replace(SIMILAR_ROOT, ARCHIVE_ROOT)
        body = [_to_json(answer, root, "STUDY") for answer in answers[query.offset:]]
        LOG.info("DICOMweb similar-case search: %d answers", len(body))
        return _dicom_json(request, body, query.warnings)

    # -- WADO-RS ----------------------------------------------------------------------------------
    def _instances(self, uids: dict[str, str], level: str) -> list[Stored]:
        """The stored instances under the resource; 404 if none."""
        found = [Stored(*row) for row in self.services.catalog.matching_instances(uids, level)]
        if not found:
            raise _not_found({"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}[level])
        return found

    def _resource(self, request: Request) -> tuple[str, list[Stored]]:
        params = request.path_params
        uids = {k: _uid(params[p], k) for p, k in (("study", "StudyInstanceUID"), ("series", "SeriesInstanceUID"),
                                                    ("instance", "SOPInstanceUID")) if p in params}
        level = LEVELS[len(uids) - 1]
        return level, self._instances(uids, level)

    def retrieve(self, request: Request) -> Response:
        """Instances as Part 10 files in a multipart/related answer, each in a syntax the Accept allows."""
        _, found = self._resource(request)
        wishes = multipart_wishes(_accept(request), DICOM)
        plan = []
        for instance in found:
            stored = instance.transfer_syntax
            syntax = next(filter(None, (_instance_syntax(part, wanted, stored) for part, wanted in wishes)), "")
            if not syntax:
                raise DicomWebError(406, f"{DICOM} is offered in {stored} (as stored) or {ExplicitVRLittleEndian}")
            plan.append((instance.path, stored, syntax))
        content_type, boundary = multipart_type(DICOM)
        parts = (Part(f"{DICOM}; transfer-syntax={syntax}",
                      instances.part10(self.services.store.absolute(path), stored, syntax))
                 for path, stored, syntax in plan)
        return StreamingResponse(multipart_body(parts, boundary), media_type=content_type)

    def metadata(self, request: Request) -> Response:
        _, found = self._resource(request)
        root = _root(request)
        return _dicom_json(request, [instances.metadata(self.services.store.absolute(i.path), i.transfer_syntax, root)
                                     for i in found])

    def frames(self, request: Request) -> Response:
        """Frames as a multipart/related answer: as stored (transfer-syntax=*) or uncompressed."""
        _, found = self._resource(request)
        path, stored = found[0].path, found[0].transfer_syntax
        numbers = _frame_numbers(request.path_params["frames"])
        wishes = multipart_wishes(_accept(request), OCTET_STREAM)
        native = next((c for c in (_frame_choice(part, wanted, stored) for part, wanted in wishes) if c is not None),
                      None)
        if native is None:
            raise DicomWebError(406, f"frames are offered as {frame_media_type(stored)} ({stored}) "
                                     f"or {OCTET_STREAM} ({ExplicitVRLittleEndian})")
        syntax = stored if native and UID(stored).is_compressed else ExplicitVRLittleEndian
        data = instances.frames(self.services.store.absolute(path), stored, numbers, native)
        content_type, boundary = multipart_type(frame_media_type(syntax))
        parts = [Part(f"{frame_media_type(syntax)}; transfer-syntax={syntax}", body) for body in data]
        return Response(b"".join(multipart_body(parts, boundary)), media_type=content_type)

    def _first_image(self, request: Request) -> Stored:
        """The resource's first image (404 when it holds only reports)."""
        _, found = self._resource(request)
        image = next((i for i in found if i.sop_class in IMAGE_STORAGE), None)
        if image is None:
            raise _not_found("image")
        return image

    def rendered(self, request: Request) -> Response:
        """The first frame as a windowed JPEG or PNG (the Renderer's picture); ``viewport`` bounds its size."""
        image = self._first_image(request)
        if request.path_params.get("frames", "1") != "1":
            raise DicomWebError(404, "only frame 1 is rendered")
        media_type = _picture_type(request)
        picture = self.renderer.picture(image.path, _viewport(request.query_params.get("viewport", "")))
        return Response(_encode(picture, media_type), media_type=media_type)

    def thumbnail(self, request: Request) -> Response:
        """A small picture of the resource's first image (cached on disk as JPEG by the Renderer)."""
        image = self._first_image(request)
        media_type = _picture_type(request)
        size = _viewport(request.query_params.get("viewport", "")) or THUMBNAIL_SIZE
        cached_sizes = (THUMBNAIL_SIZE, self.services.settings.web.thumbnail_size)
        if media_type == "image/png" or size not in cached_sizes:  # only the usual sizes fill the disk cache
            return Response(_encode(self.renderer.picture(image.path, size), media_type), media_type=media_type)
        return FileResponse(self.renderer.thumbnail(image.path, image.sop_uid, size), media_type=media_type)


def _instance_syntax(part: str, wanted: str, stored: str) -> str:
    """The syntax an instance stored in ``stored`` is sent in for a wish of ``part`` in ``wanted``
    ("" if it cannot be)."""
    if not MediaRange(part).matches(DICOM):
        return ""
    wanted = wanted or ExplicitVRLittleEndian  # PS3.18 8.7.3.5.2: the default transfer syntax
    if wanted in (ANY_SYNTAX, stored):
        return stored
    return ExplicitVRLittleEndian if wanted == ExplicitVRLittleEndian else ""


def _frame_choice(part: str, wanted: str, stored: str) -> bool | None:
    """True: send the stored bitstreams; False: send uncompressed pixels; None: this wish cannot be met."""
    native = frame_media_type(stored)
    if MediaRange(part).matches(OCTET_STREAM):
        if wanted == ANY_SYNTAX or (wanted == stored and native == OCTET_STREAM):
            return True
        if wanted in ("", ExplicitVRLittleEndian):
            return False
    if MediaRange(part).matches(native) and native != OCTET_STREAM and wanted in ("", ANY_SYNTAX, stored):
        return True
    return None


def _frame_numbers(text: str) -> list[int]:
    numbers = [n.strip() for n in text.split(",")]
    if not numbers or not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise DicomWebError(400, f"frame numbers are positive integers separated by commas, got {text!r}")
    return [int(n) for n in numbers]


def _picture_type(request: Request) -> str:
    media_type = choose(_accept(request), ["image/jpeg", "image/png"])
    if media_type is None:
        raise DicomWebError(406, "rendered images are offered as image/jpeg or image/png")
    return media_type


def _viewport(text: str) -> int | None:
    """The longest side a ``viewport=vw,vh`` parameter allows (None: the image's own size)."""
    if not text:
        return None
    sides = text.split(",")[:2]
    if not all(s.strip().isdigit() and 0 < int(s) for s in sides):
        raise DicomWebError(400, f"viewport must be two positive integers, got {text!r}")
    return min(max(int(s) for s in sides), MAX_RENDERED)


def _encode(picture: Any, media_type: str) -> bytes:
    if media_type == "image/jpeg":
        return jpeg_bytes(picture)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _error(request: Request, error: Exception) -> Response:
    if isinstance(error, DicomWebError):
        return PlainTextResponse(str(error), status_code=error.status)
    assert isinstance(error, NodeError)
    status = http_error(error).dicomweb
    retry = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return PlainTextResponse(str(error), status_code=status, headers=retry)


def _app(api: DicomWeb, studies: Callable[[Request], Response]) -> Starlette:
    instance = "/studies/{study}/series/{series}/instances/{instance}"
    table: list[tuple[str, Callable[[Request], Response]]] = [
        ("/studies", studies),
        ("/series", api.search("SERIES")),
        ("/instances", api.search("IMAGE")),
        ("/studies/{study}/series", api.search("SERIES")),
        ("/studies/{study}/instances", api.search("IMAGE")),
        ("/studies/{study}/series/{series}/instances", api.search("IMAGE")),
        ("/studies/{study}", api.retrieve),
        ("/studies/{study}/series/{series}", api.retrieve),
        (instance, api.retrieve),
        ("/studies/{study}/metadata", api.metadata),
        ("/studies/{study}/series/{series}/metadata", api.metadata),
        (f"{instance}/metadata", api.metadata),
        (f"{instance}/frames/{{frames}}", api.frames),
        (f"{instance}/rendered", api.rendered),
        (f"{instance}/frames/{{frames}}/rendered", api.rendered),
        ("/studies/{study}/thumbnail", api.thumbnail),
        ("/studies/{study}/series/{series}/thumbnail", api.thumbnail),
        (f"{instance}/thumbnail", api.thumbnail),
    ]
    return Starlette(routes=[Route(path, endpoint, methods=["GET"]) for path, endpoint in table],
                     exception_handlers={DicomWebError: _error, NodeError: _error})


def routes(services: Services, renderer: Renderer) -> list[BaseRoute]:
    """The two DICOMweb roots, ready to be mounted in the node's web app."""
    api = DicomWeb(services, renderer)
    return [Mount(ARCHIVE_ROOT, app=_app(api, api.search("STUDY"))),
            Mount(SIMILAR_ROOT, app=_app(api, api.search_similar))]
