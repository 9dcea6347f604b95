"""The similar-cases page in a real browser: headless Debian Chromium over the DevTools protocol."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.browser import Browser
from tests.dicom_node.web.conftest import WebNode

IMAGES = "Array.from(document.images).map(i => ({src: i.getAttribute('src'), done: i.complete, width: i.naturalWidth}))"
BROKEN = ("new Promise(done => { const i = new Image(); i.onload = i.onerror = () => done(i.naturalWidth); "
          "i.src = '/thumbnails/1.2.3.4.5.jpg'; })")


def test_page_renders_rows_and_thumbnails_in_chromium(web_node: WebNode, tmp_path: Path) -> None:
    query = web_node.studies[0]
    with Browser(tmp_path / "profile", height=900) as browser:
        browser.goto(f"{web_node.url}/studies/{query.uid}/similar")
        rows = browser.evaluate("Array.from(document.querySelectorAll('tr[data-study]'))"
                                ".map(r => [r.className, r.dataset.study, r.innerText])")
        images = browser.evaluate(IMAGES)
        # the check below tells a broken image from a loaded one: a missing thumbnail has no width
        assert browser.evaluate(BROKEN) == 0
        shot = tmp_path / "similar-page.png"
        browser.screenshot(shot, full_page=True)
    assert [r[0] for r in rows] == ["query"] + ["case"] * (len(web_node.studies) - 1)
    assert rows[0][1] == query.uid
    assert [r[2].split()[0] for r in rows[1:]] == [f"#{k}" for k in range(1, len(web_node.studies))]
    assert len(images) == len(web_node.studies)
    assert all(image["done"] and image["width"] > 0 for image in images), images
    with Image.open(shot) as picture:  # kept under pytest's tmp dir as the test's artefact
        assert picture.format == "PNG" and picture.width >= 1000 and picture.height > 600
        assert np.unique(np.asarray(picture.convert("L"))).size > 64  # radiographs, not a blank page
