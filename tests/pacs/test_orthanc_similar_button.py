"""Orthanc Explorer's "Similar cases" button (the repo's Orthanc Python plugin) opens the node's page."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dicom_node.server import Node
from tests.browser import Browser
from tests.helpers import dcmtk, free_port, wait_until
from tests.pacs.orthanc import OrthancProcess
from tests.pacs.test_orthanc import make_studies, settled

pytestmark = pytest.mark.slow

# Resolves to the button's href once the study page has asked Orthanc for the study's UID.
BUTTON_HREF = """new Promise((done, fail) => {
  const started = Date.now();
  (function look() {
    const link = document.getElementById('mmdl-similar');
    if (link && link.getAttribute('href').endsWith('/similar')) return done(link.href);
    if (Date.now() - started > 30000) return fail(new Error('no Similar cases link'));
    setTimeout(look, 100);
  })();
})"""


def test_similar_cases_button_opens_the_nodes_page(start_node: Callable[..., Node], shared_data: Path,
                                                   tmp_path: Path) -> None:
    node_port = free_port()
    node = start_node(node={"port": node_port}, web={"enabled": True, "port": free_port()})
    assert node.web is not None
    orthanc = OrthancProcess(tmp_path / "orthanc", node_port, similar_page=node.web.url)
    client = orthanc.start()
    try:
        studies = make_studies(shared_data, tmp_path / "send", 2)
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", orthanc.dicom_port,
                     *[f for _, files in studies for f in files])
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: settled(node) == 2, 120, "Orthanc to forward both studies and the node to index them")

        script = httpx.get(f"{orthanc.url}/plugins/explorer.js").text  # what Orthanc Explorer loads
        assert "Similar cases" in script and f"var pageUrl = {json.dumps(node.web.url)};" in script

        uid = studies[0][0]
        orthanc_id = client.post_tools_find(json={"Level": "Study", "Query": {"StudyInstanceUID": uid}})[0]
        with Browser(tmp_path / "profile", height=900) as browser:
            browser.goto(f"{orthanc.url}/app/explorer.html#study?uuid={orthanc_id}")
            href = browser.evaluate(BUTTON_HREF)
            assert href == f"{node.web.url}/studies/{uid}/similar"
            browser.goto(href)
            rows = browser.evaluate("Array.from(document.querySelectorAll('tr[data-study]')).map(r => r.dataset.study)")
            browser.screenshot(tmp_path / "opened-from-orthanc.png", full_page=True)
        assert rows == [uid, studies[1][0]]
    finally:
        orthanc.stop()


def test_without_a_page_url_the_plugin_adds_nothing(tmp_path: Path) -> None:
    orthanc = OrthancProcess(tmp_path / "orthanc", free_port(), route=False, similar_page="javascript:alert(1)")
    orthanc.start()
    try:
        assert "Similar cases" not in httpx.get(f"{orthanc.url}/plugins/explorer.js").text
        wait_until(lambda: "no 'Similar cases' button" in orthanc.log.read_text(), 30, "the plugin's error in the log")
    finally:
        orthanc.stop()
