"""Pictures of stored instances for people: windowed 8-bit JPEG thumbnails, cached on disk.

A thumbnail shows what the model sees: the file's modality LUT, its first VOI LUT or window (the
full value range without one), MONOCHROME1 inverted so that bone is bright. It is cached as
``<cache>/<SOPInstanceUID>-<size>.jpg``, written atomically, so a page of ten cases costs ten small
file reads once rendered.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dicom_node.storage import FileStore, check_uid
from models.imaging import read_dicom_image

JPEG_QUALITY = 85


def to_picture(unit: np.ndarray, size: int | None = None) -> Image.Image:
    """A 2-D array in [0, 1] (bright = dense) as an 8-bit greyscale picture, longest side at most ``size``."""
    picture = Image.fromarray(np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    if size is not None and max(picture.size) > size:
        picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    return picture


def jpeg_bytes(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class Renderer:
    """Renders stored instances (by their path relative to the store) and keeps the thumbnails."""

    def __init__(self, store: FileStore, cache_dir: Path) -> None:
        self.store = store
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)

    def picture(self, relative: str, size: int | None = None) -> Image.Image:
        """The instance's first frame as a windowed 8-bit picture (not cached)."""
        return to_picture(read_dicom_image(self.store.absolute(relative)), size)

    def thumbnail(self, relative: str, sop_uid: str, size: int = 256) -> Path:
        """The cached JPEG thumbnail of an instance, rendered on first use."""
        cached = self.cache_dir / f"{check_uid(sop_uid, 'SOPInstanceUID')}-{int(size)}.jpg"
        if not cached.exists():
            data = jpeg_bytes(self.picture(relative, size))
            handle, temporary = tempfile.mkstemp(dir=self.cache_dir, suffix=".part")
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, cached)
        return cached
