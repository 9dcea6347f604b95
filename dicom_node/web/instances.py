"""Stored instances as WADO-RS sends them: Part 10 bytes in a transfer syntax, frames, PS3.18 JSON metadata.

The node keeps each instance exactly as received; what a client asks for is made from that file here:
the file itself when its syntax is acceptable, else Explicit VR Little Endian (decoded with pydicom's
pylibjpeg plugins when the stored syntax is compressed).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_node.errors import NodeError
from dicom_node.retrieve import decoded

PIXEL_DATA = "7FE00010"
JSON_CHARSET = "ISO_IR 192"  # PS3.18 F.2: DICOM JSON is UTF-8


class FrameError(NodeError):
    """A frame number the instance does not have (or an instance without pixel data)."""

    def __init__(self, frame: int, count: int) -> None:
        super().__init__(f"frame {frame} does not exist (the instance has {count})")


def part10(path: Path, stored: str, wanted: str) -> bytes:
    """The instance as a Part 10 file in ``wanted``: the stored bytes, or re-encoded as Explicit VR LE."""
    if wanted == stored:
        return path.read_bytes()
    if wanted != ExplicitVRLittleEndian:
        raise NodeError(f"cannot convert {stored} to {wanted}")
    ds = dcmread(path)
    if UID(stored).is_compressed:
        ds = decoded(ds)  # as on a C-MOVE/C-GET: same SOP Instance UID, a lossy source stays marked lossy
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def frame_count(ds: Dataset) -> int:
    """How many frames the instance's pixel data holds (0 for an instance without an image)."""
    return int(ds.get("NumberOfFrames") or 1) if "Rows" in ds else 0


def frames(path: Path, stored: str, numbers: list[int], native: bool) -> list[bytes]:
    """Frames ``numbers`` (1-based) of the instance: the stored bitstreams when ``native``, else uncompressed
    little-endian pixels (decoded when the stored syntax is compressed)."""
    ds = dcmread(path)
    count = frame_count(ds) if "PixelData" in ds else 0
    for number in numbers:
        if not 1 <= number <= count:
            raise FrameError(number, count)
    compressed = UID(stored).is_compressed
    if compressed and native:
        bitstreams = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [bitstreams[n - 1] for n in numbers]
    if compressed:
        pixels = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<"), copy=False)
        return [(pixels if count == 1 else pixels[n - 1]).tobytes() for n in numbers]
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    data = ds.PixelData
    return [data[(n - 1) * size:n * size] for n in numbers]


def metadata(path: Path, stored: str, root: str) -> dict[str, Any]:
    """The instance's attributes as DICOM JSON; its pixel data as a BulkDataURI to its frames under ``root``."""
    ds = dcmread(path, stop_before_pixels=True)
    count = frame_count(ds)
    if "SpecificCharacterSet" in ds:
        ds.SpecificCharacterSet = JSON_CHARSET
    ds.AvailableTransferSyntaxUID = stored  # so a viewer knows which frames it may ask for natively
    answer = ds.to_json_dict()  # binary values other than the pixel data travel inline
    if count:
        vr = "OB" if UID(stored).is_compressed or int(ds.get("BitsAllocated", 16)) <= 8 else "OW"
        frames_uri = (f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                      f"/instances/{ds.SOPInstanceUID}/frames/")
        answer[PIXEL_DATA] = {"vr": vr, "BulkDataURI": frames_uri + ",".join(map(str, range(1, count + 1)))}
    return answer

