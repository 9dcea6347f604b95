"""The node with its shipped model, loaded the way `mmdl-node serve` loads it (no model path configured).

Real associations on loopback: studies from NIH images and reports go in with storescu, the
similar-case C-FIND comes back with calibrated findings and the match probability.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from config import settings_from_mapping
from dicom_node.server import Node
from dicom_node.similar import (
    FINDING_PROBABILITIES,
    MATCH_PROBABILITY,
    PREDICTED_FINDINGS,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    SCORE,
)
from models.bundle_manifest import DEFAULT_MODEL_DIR
from models.calibration import MAX_SHOWN, load_calibration
from models.observations import OBSERVATIONS
from tests.dicom_node.builders import basic_text_sr, dx_from_png, save
from tests.dicom_node.peers import find, indexed, storescu, study_query
from tests.helpers import free_port, wait_until

REPORTS = (("Right lower lobe airspace opacity.", "Pneumonia."),
           ("Heart size is normal. Lungs are clear.", "No acute disease."),
           ("Diffuse bilateral opacities.", "Edema versus infection."),
           ("Lungs are clear.", "Normal chest."))


@pytest.fixture()
def shipped_node(tmp_path: Path, shared_data: Path) -> Iterator[tuple[Node, list[str]]]:
    """A node on the shipped model holding 4 studies and a copy of the first under another UID and patient."""
    settings = settings_from_mapping({
        "node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(tmp_path / "node")},
        "scheduler": {"interval_s": 0.2, "batch_size": 8},
        "model": {"device": "cpu"},  # no path: the shipped model, as `mmdl-node serve` loads it
        "index": {"snapshot_interval_s": 3600},
    })
    node = Node(settings)
    node.start()
    pngs = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[::40][: len(REPORTS)]
    files, uids = [], []
    for i, (png, (findings, impression)) in enumerate([*zip(pngs, REPORTS), (pngs[0], REPORTS[0])]):
        uid, patient = generate_uid(), f"SHIPPED{i}"
        uids.append(uid)
        files += [save(dx_from_png(png, uid, patient, f"S{i}"), tmp_path / str(i)),
                  save(basic_text_sr(uid, patient, f"S{i}", findings, impression), tmp_path / str(i))]
    result = storescu(node, *files)
    assert result.returncode == 0, result.stderr
    wait_until(indexed(node, len(uids)), 300, "the studies to be indexed by the shipped model")
    yield node, uids
    node.stop()


def _values(element: DataElement) -> list[str]:
    """The values of a possibly multi-valued element as strings (none when empty)."""
    if element.VM == 0:
        return []
    return [str(v) for v in element.value] if element.VM > 1 else [str(element.value)]


def test_a_study_sent_twice_ranks_its_copy_first_with_calibrated_findings(shipped_node: tuple[Node, list[str]]) -> None:
    node, uids = shipped_node
    calibration = load_calibration(DEFAULT_MODEL_DIR)
    assert calibration is not None and node.services.calibration == calibration
    answers, final = find(node, study_query(StudyInstanceUID=uids[0]), "MMDL_SIMILAR")
    assert final.Status == 0 and len(answers) == len(uids) - 1
    assert answers[0].StudyInstanceUID == uids[-1]  # the same image and report under another UID
    for rank, answer in enumerate(answers, start=1):
        block = answer.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        cosine, match = float(block[SCORE].value), float(block[MATCH_PROBABILITY].value)
        assert match == pytest.approx(calibration.match_probability(cosine), abs=1e-4)
        assert answer.StudyDescription.startswith(f"#{rank} {match:.0%}: ")
        findings = _values(block[PREDICTED_FINDINGS])
        assert len(findings) <= MAX_SHOWN and set(findings) <= set(OBSERVATIONS)
        assert not ("No Finding" in findings and len(findings) > 1)
        if findings:
            probabilities = [float(p) for p in _values(block[FINDING_PROBABILITIES])]
            assert probabilities == sorted(probabilities, reverse=True) and len(probabilities) == len(findings)
            assert re.search(re.escape(", ".join(findings)), answer.StudyDescription)
    first = float(answers[0].private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[SCORE].value)
    assert first > 0.999  # the copy's vector is the query's own
