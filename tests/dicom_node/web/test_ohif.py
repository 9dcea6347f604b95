"""OHIF (npm ``@ohif/app``, served offline by scripts/ohif.py) in headless Chromium shows the node's studies.

The OHIF download is fetched once by ``scripts/ohif.py fetch`` (CI does it in .ci/run); the test does not
download. Screenshots are kept in $MMDL_TEST_ARTEFACTS (else pytest's temporary folder).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from dicom_node.web.dicomweb import SIMILAR_ROOT
from tests.browser import Browser, BrowserError
from tests.conftest import REPO_ROOT
from tests.dicom_node.web.conftest import Server
from tests.helpers import free_port, wait_for_port

SCRIPT = REPO_ROOT / "scripts" / "ohif.py"
DIST = REPO_ROOT / ".cache" / "ohif"
RENDER_TIMEOUT_S = 60.0
# The cornerstone viewports OHIF lays out: their canvases, as [left, top, width, height].
VIEWPORTS = """[...document.querySelectorAll('[data-viewport-uid] canvas, canvas.cornerstone-canvas')]
  .map(c => c.getBoundingClientRect()).filter(r => r.width > 100 && r.height > 100)
  .map(r => [r.left, r.top, r.width, r.height])"""

FAILED_REQUESTS = """performance.getEntriesByType('resource').filter(e => e.responseStatus >= 400)
  .map(e => e.responseStatus + ' ' + e.name).slice(-10)"""


@pytest.fixture(scope="module")
def ohif(server: Server) -> Iterator[str]:
    """scripts/ohif.py serving the cached OHIF against the test node's DICOMweb."""
    if not any(DIST.glob("*/package/dist/index.html")):
        pytest.fail(f"OHIF is not fetched: run {SCRIPT} fetch (once; .ci/run does)")
    port = free_port()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "serve", "--node", server.url, "--port", str(port)],
                               stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture()
def browser(ohif: str, tmp_path: Path) -> Iterator[Browser]:
    """A fresh browser profile that has already seen OHIF's first-visit tour (it would cover the viewport)."""
    page = Browser(tmp_path / "profile")
    page.goto(f"{ohif}/app-config.js")
    page.wait_for("document.readyState === 'complete'", 30, "the config script")
    page.evaluate("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
    yield page
    page.close()


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("MMDL_TEST_ARTEFACTS") or tmp_path_factory.mktemp("artefacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shows_a_radiograph(picture: Image.Image, box: list[float]) -> bool:
    """Whether the middle of a viewport holds a greyscale image with many grey levels: not a blank or
    uniform canvas, not a (coloured, few-level) loading indicator, not the corner text overlays."""
    left, top, width, height = box
    middle = np.asarray(picture.crop((int(left + width / 4), int(top + height / 4),
                                      int(left + 3 * width / 4), int(top + 3 * height / 4))), dtype=np.float64)
    grey = middle.mean(axis=2)
    colourless = np.abs(middle - grey[..., None]).mean() < 3.0
    return colourless and grey.std() > 15.0 and len(np.unique(grey.round())) > 64


def rendered_viewports(browser: Browser, count: int, artefact: Path) -> list[list[float]]:
    """Wait until ``count`` viewports each show a radiograph; keep the screenshot as ``artefact``."""
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while True:
        boxes = browser.evaluate(VIEWPORTS) or []
        picture = browser.screenshot()
        if len(boxes) >= count and all(shows_a_radiograph(picture, box) for box in boxes[:count]):
            picture.save(artefact)
            return boxes
        if time.monotonic() > deadline:
            picture.save(artefact)
            failed = browser.evaluate(FAILED_REQUESTS)
            raise BrowserError("render", f"{count} rendered viewport(s) not seen within {RENDER_TIMEOUT_S:.0f} s "
                                         f"({len(boxes)} canvases; screenshot {artefact}); failed requests: "
                                         f"{failed}; console: {browser.console[-10:]}")
        time.sleep(1.0)


def test_ohif_renders_a_stored_study(server: Server, ohif: str, browser: Browser, artefacts: Path) -> None:
    study = server.studies["j2k"]  # JPEG 2000 as stored, decoded by OHIF from the node's frames
    browser.goto(f"{ohif}/viewer?StudyInstanceUIDs={study.study}")
    [box] = rendered_viewports(browser, 1, artefacts / "ohif-study.png")[:1]
    assert box[2] > 300 and box[3] > 300


def test_ohif_opens_a_study_beside_its_most_similar(server: Server, ohif: str, browser: Browser,
                                                    artefacts: Path) -> None:
    query = server.studies["explicit"]
    similar = requests.get(f"{server.url}{SIMILAR_ROOT}/studies",
                           params={"StudyInstanceUID": query.study, "limit": 1}).json()
    top = similar[0]["0020000D"]["Value"][0]
    browser.goto(f"{ohif}/viewer?StudyInstanceUIDs={query.study}&StudyInstanceUIDs={top}"
                 "&hangingProtocolId=@ohif/hpCompare")
    boxes = rendered_viewports(browser, 2, artefacts / "ohif-similar.png")
    assert boxes[0][0] != boxes[1][0], "the two studies side by side"



def test_ohif_study_list_lists_the_node(server: Server, ohif: str, browser: Browser, artefacts: Path) -> None:
    """OHIF's study list searches /dicomweb/studies (limit, offset, includefield) and shows every study."""
    browser.goto(f"{ohif}/")
    total = f"of {len(server.studies)}"
    browser.wait_for(f"!!document.body && document.body.innerText.includes({total!r})", 60,
                     f"the study list to say {total!r}")
    browser.screenshot().save(artefacts / "ohif-study-list.png")
    assert not [line for line in browser.console if line.startswith("HTTP ")], browser.console
