"""Start-up with a large index: the ports open first and the index loads in the background (held back here by
a gate on the load), while storage, echo, catalog queries and /health work and similar-case queries are refused
with a retryable answer; a stop during the load leaves the snapshot as it was."""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path

import pytest

from dicom_node.server import Node
from dicom_node.status import Status
from indexer.catalog import Catalog
from indexer.schema import Instance
from indexer.vector_index import HnswParams, VectorIndex
from tests.dicom_node.peers import find, indexed, storescu, study_query
from tests.helpers import dcmtk, free_port, wait_until


@pytest.fixture()
def hold_loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], threading.Event]]:
    """Call it to hold every later index load back until the event it returns is set (set at the end of the
    test at the latest, so that no loader is left waiting)."""
    gate = threading.Event()
    open_index = VectorIndex.open

    def held(cls: type[VectorIndex], params: HnswParams, directory: Path, catalog: Catalog) -> VectorIndex:
        assert gate.wait(60), "the test never opened the gate"
        return open_index(params, directory, catalog)

    def hold() -> threading.Event:
        monkeypatch.setattr(VectorIndex, "open", classmethod(held))
        return gate

    yield hold
    gate.set()


def get(url: str) -> tuple[int, Message, bytes]:
    """(status, headers, body) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def indexed_node(start_node: Callable[..., Node], studies: list[dict[str, object]], count: int) -> Path:
    """Index ``count`` of the studies on a node and stop it; its index folder, which holds their snapshot."""
    node = start_node()
    assert storescu(node, *(s["image"] for s in studies[:count]), *(s["report"] for s in studies[:count])) \
        .returncode == 0
    wait_until(indexed(node, count), 120, "the studies to be indexed")
    node.stop()
    return node.settings.node.data_dir / "index"


def test_everything_but_similar_cases_works_while_the_index_loads(
        start_node: Callable[..., Node], studies: list[dict[str, object]],
        hold_loads: Callable[[], threading.Event], caplog: pytest.LogCaptureFixture) -> None:
    indexed_node(start_node, studies, 3)
    gate = hold_loads()
    web, metrics = free_port(), free_port()
    node = start_node(web={"enabled": True, "host": "127.0.0.1", "port": web},
                      metrics={"enabled": True, "host": "127.0.0.1", "port": metrics},
                      reference_sheet={"enabled": True, "for_every_new_study": True})
    assert node.index.state == "loading"

    echo = dcmtk("echoscu", "-aec", "MMDL_NODE", "127.0.0.1", node.port)
    assert echo.returncode == 0, echo.stderr
    stored = storescu(node, studies[3]["image"])
    assert stored.returncode == 0, stored.stderr
    with node.catalog.session() as session:
        path = session.query(Instance).filter_by(sop_uid=studies[3]["sop"]).one().path
    assert node.store.absolute(path).is_file()
    answers, final = find(node, study_query(StudyInstanceUID=str(studies[3]["uid"])))
    assert final.Status == Status.SUCCESS and [a.StudyInstanceUID for a in answers] == [studies[3]["uid"]]

    query = study_query(StudyInstanceUID=str(studies[0]["uid"]))
    answers, final = find(node, query, called="MMDL_SIMILAR")
    assert answers == [] and final.Status == 0xA700
    assert final.ErrorComment == "similarity index loading, retry shortly"
    for url in (f"http://127.0.0.1:{web}/api/studies/{studies[0]['uid']}/similar",
                f"http://127.0.0.1:{web}/dicomweb-similar/studies?StudyInstanceUID={studies[0]['uid']}"):
        code, headers, _ = get(url)
        assert code == 503 and headers["Retry-After"] == "1", url
    code, _, body = get(f"http://127.0.0.1:{metrics}/health")
    assert code == 200 and json.loads(body) == {"status": "ok", "dicom": True, "catalog": True, "index": "loading"}

    time.sleep(1.0)  # five rounds of the embedding job: none touches the loading index
    assert [row.payload for row in node.catalog.pending_images(10)] == [path]
    with caplog.at_level(logging.WARNING):
        assert node.sheets.create_for_new_studies() == 0
    assert "reference sheet" not in caplog.text  # skipped, not tried study by study

    gate.set()
    wait_until(lambda: node.index.ready, 30, "the index to load")
    answers, final = find(node, query, called="MMDL_SIMILAR")
    assert final.Status == Status.SUCCESS and len(answers) == 2
    wait_until(indexed(node, 4), 120, "the study stored during the load to be indexed")
    code, _, body = get(f"http://127.0.0.1:{metrics}/health")
    assert code == 200 and json.loads(body)["index"] == "ready"


def test_stop_during_the_load_keeps_the_snapshot(start_node: Callable[..., Node], studies: list[dict[str, object]],
                                                 hold_loads: Callable[[], threading.Event]) -> None:
    folder = indexed_node(start_node, studies, 2)
    gate = hold_loads()
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert len(before) == 2  # current.json and the snapshot it names
    node = start_node()
    assert storescu(node, studies[2]["image"]).returncode == 0  # the catalog changes, the index does not
    started = time.monotonic()
    node.stop()
    assert time.monotonic() - started < 10 and node.index.state == "loading"
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before

    gate.set()  # the stopped node's loader finishes on its own
    loaded = VectorIndex.load_snapshot(node.index.params, folder)
    assert loaded is not None and len(loaded) == 2
    again = start_node()
    wait_until(lambda: again.index.ready, 30, "the index to load")
    assert len(again.index) >= 2
    wait_until(indexed(again, 3), 120, "the study stored during the stopped load to be indexed")
