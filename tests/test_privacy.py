"""Logs carry UIDs and counts, never patient names, IDs or report text, unless the admin turns that on."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.dicom_node.builders import basic_text_sr, dx_from_png, save
from tests.helpers import dcmtk, free_port, wait_until
from tests.node_process import NodeProcess

pytestmark = pytest.mark.slow
NAME, PATIENT_ID, REPORT = "Phimarker^Zelda", "PHI-ID-7781", "Phimarkertext nodular opacity"


def exercise(node: NodeProcess, shared_data: Path, folder: Path, web_port: int) -> str:
    """Store, index and query (DICOM, the web page and DICOMweb) a study that carries marker PHI; return
    everything the node logged."""
    png = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[0]
    uid = generate_uid()
    image = dx_from_png(png, uid, PATIENT_ID, "PHIACC1")
    image.PatientName = NAME
    report = basic_text_sr(uid, PATIENT_ID, "PHIACC1", REPORT, REPORT)
    report.PatientName = NAME
    files = [save(image, folder), save(report, folder)]
    assert dcmtk("storescu", "-aec", "MMDL_NODE", "127.0.0.1", node.port, *files).returncode == 0

    def indexed() -> bool:
        catalog = node.catalog()
        try:
            study = catalog.find_study(uid)
            return study is not None and study.vector is not None
        finally:
            catalog.close()

    wait_until(indexed, 120, "the study to be indexed")
    for called, keys in (("MMDL_NODE", [f"PatientName={NAME}", f"PatientID={PATIENT_ID}"]),
                         ("MMDL_SIMILAR", [f"StudyInstanceUID={uid}", "PatientName", "PatientID"])):
        args = [a for k in keys for a in ("-k", k)]
        assert dcmtk("findscu", "-S", "-aec", called, "-k", "QueryRetrieveLevel=STUDY", *args,
                     "127.0.0.1", node.port).returncode == 0
    web = f"http://127.0.0.1:{web_port}"
    page = httpx.get(f"{web}/similar", params={"accession": "PHIACC1"})
    assert page.status_code == 200 and NAME in page.text  # the page shows the query's own patient
    assert httpx.get(f"{web}/api/studies/{uid}/similar").status_code == 200
    assert httpx.get(f"{web}/similar", params={"accession": "PHIACC-UNKNOWN"}).status_code == 404
    # DICOMweb: QIDO-RS by the patient's ID and name (both in the request URL), WADO-RS metadata (PHI in the answer)
    for keys in ({"PatientID": PATIENT_ID}, {"PatientName": NAME}):
        found = httpx.get(f"{web}/dicomweb/studies", params=keys, headers={"Accept": "application/dicom+json"})
        assert found.status_code == 200, (keys, found.text)
        assert [study["0020000D"]["Value"] for study in found.json()] == [[uid]], keys
    metadata = httpx.get(f"{web}/dicomweb/studies/{uid}/metadata", headers={"Accept": "application/dicom+json"})
    assert metadata.status_code == 200, metadata.text
    assert PATIENT_ID in metadata.text and "Phimarker" in metadata.text  # the answer does carry the markers
    node.stop()
    return node.log.read_text(errors="replace")


@pytest.mark.parametrize("log_phi", [False, True])
def test_no_phi_in_logs_unless_enabled(tmp_path: Path, random_model_dir: Path, shared_data: Path, log_phi: bool) -> None:
    web_port = free_port()
    node = NodeProcess(tmp_path, random_model_dir, free_port(),
                       extra=f'[logging]\nlevel = "DEBUG"\nlog_phi = {str(log_phi).lower()}\n'
                             f'[web]\nenabled = true\nport = {web_port}\n')
    node.start()
    log = exercise(node, shared_data, tmp_path / "send", web_port)
    assert "similar page" in log
    assert "stored image instance" in log  # the log is really written, at DEBUG level
    hits = [marker for marker in ("Phimarker", PATIENT_ID) if marker in log]
    assert ("C-FIND response 1 identifier" in log) == log_phi  # the answers the node sends itself, as pynetdicom's
    if log_phi:
        assert hits, "with log_phi on, pynetdicom's identifier dumps should show the markers"
    else:
        assert hits == []
        assert "PHIACC" not in log  # nor accession numbers, which the page's URLs carry
