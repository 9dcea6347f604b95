"""DICOMweb content negotiation (PS3.18 8.7): the Accept header read into acceptable media types, and
multipart/related bodies written.

Only what the node's WADO-RS answers need: ``multipart/related`` with a ``type`` and an optional
``transfer-syntax`` parameter, single-part image types for rendered resources, and ``q`` weights.
"""
from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

ANY_SYNTAX = "*"  # transfer-syntax=*: the origin server chooses (the node: as stored)
# PS3.18 Table 8.7.3-5: the media type of a frame (bulk data) in each transfer syntax.
FRAME_MEDIA_TYPE = {
    JPEGBaseline8Bit: "image/jpeg",
    JPEGExtended12Bit: "image/jpeg",
    JPEGLossless: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg",
    JPEGLSLossless: "image/jls",
    JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2",
    JPEG2000: "image/jp2",
    RLELossless: "image/x-dicom-rle",
}
OCTET_STREAM = "application/octet-stream"


class NotAcceptableError(ValueError):
    """No representation the node can make satisfies the Accept header (HTTP 406)."""

    def __init__(self, accept: str, offered: str) -> None:
        super().__init__(f"cannot answer Accept {accept!r}; this resource is offered as {offered}")


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header; a ``multipart/related`` range names its parts' type and transfer syntax."""

    type: str
    part_type: str = ""
    transfer_syntax: str = ""
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        """Whether this range admits ``media_type`` (``*/*`` and ``image/*`` style wildcards included)."""
        wanted, _, wanted_sub = self.type.partition("/")
        kind, _, sub = media_type.partition("/")
        return wanted in ("*", kind) and wanted_sub in ("*", sub)


def _split(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside double quotes."""
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str) -> list[MediaRange]:
    """The Accept header's media ranges, best first (``q`` descending, then header order); none: ``*/*``."""
    ranges: list[MediaRange] = []
    for entry in _split(header or "*/*", ","):
        pieces = [p.strip() for p in _split(entry, ";")]
        if not pieces[0]:
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 0.0
        if q > 0:
            ranges.append(MediaRange(pieces[0].lower(), params.get("type", "").lower(),
                                     params.get("transfer-syntax", ""), q))
    return sorted(ranges, key=lambda r: -r.q)


def multipart_wishes(ranges: list[MediaRange], default_part: str) -> list[tuple[str, str]]:
    """(part type, transfer syntax) of each range that admits a multipart/related answer, best first; a range
    without ``type`` asks for ``default_part``, one without ``transfer-syntax`` for the default ("")."""
    return [(r.part_type or default_part, r.transfer_syntax) for r in ranges if r.matches("multipart/related")]


def choose(ranges: list[MediaRange], offered: list[str]) -> str | None:
    """The first of ``offered`` single-part media types that the best admitting range accepts."""
    for r in ranges:
        for media_type in offered:
            if r.matches(media_type):
                return media_type
    return None


def frame_media_type(transfer_syntax: str) -> str:
    """The media type a frame is sent as in ``transfer_syntax`` (uncompressed: application/octet-stream)."""
    return FRAME_MEDIA_TYPE.get(transfer_syntax, OCTET_STREAM)


@dataclass(frozen=True)
class Part:
    content_type: str
    body: bytes
    location: str = ""


def multipart_type(part_type: str) -> tuple[str, str]:
    """(Content-Type of a multipart/related answer whose root parts are ``part_type``, its boundary)."""
    boundary = secrets.token_hex(16)
    return f'multipart/related; type="{part_type}"; boundary={boundary}', boundary


def multipart_body(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related answer, one part at a time (RFC 2387)."""
    for part in parts:
        head = f"--{boundary}\r\nContent-Type: {part.content_type}\r\n"
        if part.location:
            head += f"Content-Location: {part.location}\r\n"
        yield (head + "\r\n").encode("ascii") + part.body + b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


