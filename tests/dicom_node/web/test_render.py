"""Thumbnails of real chest radiographs: windowed, MONOCHROME1 shown bright-bone, cached on disk."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.errors import NodeError
from dicom_node.storage import FileStore
from dicom_node.web.render import Renderer

RG1 = "dicom/pydicom-data_WG04_RG1"
XRV = "dicom/torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
XRV_MONO1 = "dicom/torchxrayvision_tests/derived_not_real/Fake_MONOHR1.dcm"


def stored(store: FileStore, source: Path, sop_uid: str) -> str:
    relative = store.relative_path("1.2.3", "1.2.3.4", sop_uid)
    store.absolute(relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, store.absolute(relative))
    return relative


@pytest.fixture()
def renderer(tmp_path: Path) -> Renderer:
    return Renderer(FileStore(tmp_path / "storage"), tmp_path / "thumbnails")


def test_thumbnail_is_a_cached_jpeg_of_the_requested_size(renderer: Renderer, shared_data: Path) -> None:
    relative = stored(renderer.store, shared_data / RG1 / "RG1_J2KR.dcm", "1.2.3.4.1")
    path = renderer.thumbnail(relative, "1.2.3.4.1", 128)
    with Image.open(path) as picture:
        assert picture.format == "JPEG" and picture.mode == "L"
        assert max(picture.size) == 128
        pixels = np.asarray(picture, dtype=np.float64)
    assert pixels.std() > 20, "a windowed radiograph has contrast, not a flat grey"
    mtime = path.stat().st_mtime_ns
    renderer.store.absolute(relative).unlink()  # served from the cache, not rendered again
    assert renderer.thumbnail(relative, "1.2.3.4.1", 128) == path and path.stat().st_mtime_ns == mtime
    assert list(renderer.cache_dir.glob("*.part")) == []


def test_monochrome1_is_shown_inverted(renderer: Renderer, shared_data: Path) -> None:
    """The same stored values relabelled MONOCHROME1 (a test artefact) must render as the negative."""
    mono2 = np.asarray(renderer.picture(stored(renderer.store, shared_data / XRV, "1.2.3.4.2"), 64), dtype=float)
    mono1 = np.asarray(renderer.picture(stored(renderer.store, shared_data / XRV_MONO1, "1.2.3.4.3"), 64), dtype=float)
    assert np.abs((255 - mono1) - mono2).mean() < 3.0
    assert np.abs(mono1 - mono2).mean() > 40.0


def test_thumbnail_refuses_a_uid_that_would_leave_the_cache(renderer: Renderer, shared_data: Path) -> None:
    relative = stored(renderer.store, shared_data / XRV, "1.2.3.4.4")
    with pytest.raises(NodeError):
        renderer.thumbnail(relative, "../../evil", 64)
