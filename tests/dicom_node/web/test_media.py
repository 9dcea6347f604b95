"""Content negotiation: Accept headers as OHIF, dicomweb-client and browsers write them."""
from __future__ import annotations

from dicom_node.web.media import MediaRange, Part, choose, multipart_body, multipart_wishes, parse_accept


def test_quoted_and_unquoted_multipart_parameters_read_alike() -> None:
    quoted = parse_accept('multipart/related; type="application/octet-stream"; transfer-syntax=*')
    bare = parse_accept("multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert quoted == bare == [MediaRange("multipart/related", "application/octet-stream", "*")]


def test_ranges_are_ordered_by_q_and_q0_is_refused() -> None:
    ranges = parse_accept("image/png;q=0.5, image/jpeg, image/gif;q=0")
    assert [r.type for r in ranges] == ["image/jpeg", "image/png"]
    assert choose(ranges, ["image/png", "image/jpeg"]) == "image/jpeg"
    assert choose(parse_accept("image/gif"), ["image/jpeg", "image/png"]) is None
    assert choose(parse_accept(""), ["image/jpeg"]) == "image/jpeg"  # no Accept: anything


def test_multipart_wishes_default_the_part_type() -> None:
    wishes = multipart_wishes(parse_accept("*/*, multipart/related; type=image/jp2"), "application/octet-stream")
    assert wishes == [("application/octet-stream", ""), ("image/jp2", "")]
    assert multipart_wishes(parse_accept("application/dicom+json"), "application/dicom") == []


def test_multipart_body_frames_each_part() -> None:
    body = b"".join(multipart_body([Part("image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90", b"\xff\x4f")], "B"))
    assert body == (b"--B\r\nContent-Type: image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90\r\n\r\n"
                    b"\xff\x4f\r\n--B--\r\n")
