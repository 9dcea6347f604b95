"""The node with a third DICOM toolkit as its client: dcmjs-dimse (Node.js), driven by tests/dcmjs/peer.js.

Every operation a viewer uses: C-ECHO, C-STORE, C-FIND on both AE titles (catalog and similar cases),
C-MOVE (dcmjs-dimse is the destination too) and C-GET.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.server import Node
from dicom_node.status import Status
from tests.dicom_node.builders import ROOT, basic_text_sr, dx_from_png, save
from tests.dicom_node.studies import Study, assert_as_stored, by_sop, sample_study, upload
from tests.helpers import free_port, wait_until

PEER = Path(__file__).resolve().parents[1] / "dcmjs"
if shutil.which("node") is None or not (PEER / "node_modules" / "dcmjs-dimse").is_dir():
    pytest.skip("dcmjs-dimse is not installed: run `npm ci --prefix tests/dcmjs` (Node.js 18+), as .ci/run does",
                allow_module_level=True)


def dcmjs(operation: str, node: Node, called: str, *args: str | Path) -> dict[str, Any]:
    """Run one dcmjs-dimse operation against the node; its outcome (statuses, datasets, files)."""
    result = subprocess.run(["node", str(PEER / "peer.js"), operation, "127.0.0.1", str(node.port), called,
                             *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [e for e in outcome["errors"] if e.startswith("network error")], outcome
    return outcome


def test_dcmjs_echo_on_both_titles(start_node: Callable[..., Node]) -> None:
    node = start_node()
    for title in ("MMDL_NODE", "MMDL_SIMILAR"):
        assert dcmjs("echo", node, title)["statuses"] == [Status.SUCCESS]


def test_dcmjs_store_find_and_similar(start_node: Callable[..., Node], shared_data: Path, tmp_path: Path) -> None:
    """dcmjs-dimse stores three studies (DX image and SR report each), finds them in the catalog, and asks
    for the studies similar to the first."""
    node = start_node()
    pngs = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[:3]
    uids, files = [], []
    for i, png in enumerate(pngs):
        uid = generate_uid(prefix=ROOT)
        uids.append(uid)
        files += [save(dx_from_png(png, uid, f"JS-{i}", f"JSACC{i}"), tmp_path),
                  save(basic_text_sr(uid, f"JS-{i}", f"JSACC{i}", "Lungs are clear.", "Normal."), tmp_path)]
    stored = dcmjs("store", node, "MMDL_NODE", *files)
    assert stored["statuses"] == [Status.SUCCESS] * len(files)

    found = dcmjs("find", node, "MMDL_NODE", json.dumps({"PatientID": "JS-*", "StudyInstanceUID": "",
                                                          "ModalitiesInStudy": ""}))
    assert found["statuses"][-1] == Status.SUCCESS
    assert sorted(d["StudyInstanceUID"] for d in found["datasets"]) == sorted(uids)
    assert all(d["ModalitiesInStudy"] == ["DX", "SR"] for d in found["datasets"])

    wait_until(lambda: len(node.index) == 3 and not node.catalog.dirty_studies(1), 120, "the studies to be indexed")
    similar = dcmjs("find", node, "MMDL_SIMILAR", json.dumps({"StudyInstanceUID": uids[0], "StudyDescription": ""}))
    assert similar["statuses"][-1] == Status.SUCCESS
    assert {d["StudyInstanceUID"] for d in similar["datasets"]} == set(uids[1:])
    assert [d["StudyDescription"].split()[0] for d in similar["datasets"]] == ["#1", "#2"]


@pytest.fixture()
def mixed_study(start_node: Callable[..., Node], shared_data: Path,
                tmp_path: Path) -> Callable[..., tuple[Node, Study]]:
    """A node (embedding job idle) holding RG1 uncompressed, JPEG 2000 and RLE, with its SR report."""
    def start(**sections: Any) -> tuple[Node, Study]:
        node = start_node(scheduler={"interval_s": 3600}, **sections)
        (tmp_path / "study").mkdir()
        study = sample_study(shared_data, tmp_path / "study", "explicit", "j2k", "rle")
        upload(node, study)
        return node, study
    return start


def test_dcmjs_get_receives_the_study_decoded(mixed_study: Callable[..., tuple[Node, Study]], tmp_path: Path) -> None:
    """dcmjs-dimse offers uncompressed syntaxes only for C-GET: every image arrives decoded, pixels intact."""
    node, study = mixed_study()
    out = tmp_path / "got"
    out.mkdir()
    got = dcmjs("get", node, "MMDL_NODE", study.uid, out)
    assert got["statuses"][-1] == Status.SUCCESS and len(got["files"]) == 4
    received = by_sop(out)
    assert set(received) == {study.sop(kind) for kind in study.files}
    for kind in ("explicit", "j2k", "rle"):
        assert np.array_equal(received[study.sop(kind)].pixel_array, dcmread(study.files[kind]).pixel_array)


def test_dcmjs_move_receives_the_stored_bytes(mixed_study: Callable[..., tuple[Node, Study]], tmp_path: Path) -> None:
    """As the destination, dcmjs-dimse accepts every context the node proposes, one per stored syntax."""
    port = free_port()
    node, study = mixed_study(peers=[{"ae_title": "DCMJS", "host": "127.0.0.1", "port": port}])
    out = tmp_path / "moved"
    out.mkdir()
    moved = dcmjs("move", node, "MMDL_NODE", study.uid, out, str(port))
    assert moved["statuses"][-1] == Status.SUCCESS
    assert_as_stored(study, by_sop(out), same_fragments=False)


def test_dcmjs_retrieve_without_a_study_uid_is_refused(mixed_study: Callable[..., tuple[Node, Study]],
                                                      tmp_path: Path) -> None:
    port = free_port()
    node, _ = mixed_study(peers=[{"ae_title": "DCMJS", "host": "127.0.0.1", "port": port}])
    out = tmp_path / "got"
    out.mkdir()
    for operation, args in (("get", ("", out)), ("move", ("", out, str(port)))):
        outcome = dcmjs(operation, node, "MMDL_NODE", *args)
        assert outcome["statuses"] == [Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS], operation
        assert outcome["files"] == [] and list(out.iterdir()) == []
