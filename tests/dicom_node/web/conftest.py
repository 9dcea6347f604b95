"""Running nodes holding real chest X-ray studies stored over DICOM: one with its web server (the similar-cases
page), one holding radiographs in every encoding (uncompressed, JPEG 2000, JPEG baseline, MONOCHROME1, Implicit VR)
for the DICOMweb and OHIF tests."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from dicom_node.server import Node
from dicom_node.web.dicomweb import ARCHIVE_ROOT
from tests.dicom_node.builders import ROOT, basic_text_sr, dx_from_png, save
from tests.dicom_node.conftest import node_settings
from tests.dicom_node.peers import indexed
from tests.dicom_node.studies import SampleInstance, sample_study, upload
from tests.helpers import dcmtk, free_port, wait_until

OHIF, STONE = "http://ohif.test:3000", "http://pacs.test:8042/stone-webviewer"
DICOMWEB = "http://node.test:8080/dicomweb"
INJECTION = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@dataclass(frozen=True)
class StoredStudy:
    uid: str
    patient_id: str
    patient_name: str
    accession: str
    sop_uid: str
    report: str | None


@dataclass(frozen=True)
class WebNode:
    node: Node
    studies: list[StoredStudy]

    @property
    def url(self) -> str:
        assert self.node.web is not None
        return self.node.web.url


def store_studies(node: Node, shared_data: Path, folder: Path, count: int) -> list[StoredStudy]:
    """``count`` studies of one NIH CXR14 radiograph each (DX), stored with storescu; studies 0 and 1 share a
    patient, the last has no report, study 2's report carries markup that must be shown as text."""
    pngs = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[:count]
    studies, files = [], []
    for i, png in enumerate(pngs):
        uid = generate_uid(prefix=ROOT)
        patient = "PAT-A" if i < 2 else f"PAT-{i}"
        image = dx_from_png(png, uid, patient, f"ACC{i}")
        image.StudyDate = f"2024010{i + 1}"
        image.StudyDescription = INJECTION if i == 0 else "CHEST PA"
        files.append(save(image, folder / str(i)))
        report = None
        if i < count - 1:
            findings = f"Findings of case {i}." + (f" {INJECTION}" if i == 2 else "")
            report = f"{findings}\nImpression of case {i}."
            sr = basic_text_sr(uid, patient, f"ACC{i}", findings, f"Impression of case {i}.")
            sr.StudyDate, sr.StudyDescription = image.StudyDate, image.StudyDescription
            files.append(save(sr, folder / str(i)))
        studies.append(StoredStudy(uid, patient, str(image.PatientName), f"ACC{i}", str(image.SOPInstanceUID), report))
    sent = dcmtk("storescu", "-aet", "PACS", "-aec", "MMDL_NODE", "127.0.0.1", node.port, *files)
    assert sent.returncode == 0, sent.stderr
    wait_until(indexed(node, count), 120, f"{count} studies to be indexed")
    return studies


def start_web_node(folder: Path, model_dir: Path, **web: Any) -> Node:
    settings = node_settings(folder, model_dir, web={
        "enabled": True, "host": "127.0.0.1", "port": free_port(),
        "ohif_url": OHIF, "stone_url": STONE, "weasis_dicomweb_url": DICOMWEB, **web})
    node = Node(settings)
    node.start()
    return node


@pytest.fixture(scope="module")
def web_node(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path, shared_data: Path) -> Iterator[WebNode]:
    """Six studies indexed by a node whose web server links to OHIF, Stone and Weasis."""
    folder = tmp_path_factory.mktemp("web-node")
    node = start_web_node(folder / "node", random_model_dir)
    try:
        yield WebNode(node, store_studies(node, shared_data, folder / "send", 6))
    finally:
        node.stop()


KINDS = ("explicit", "j2k", "jpeg", "jpeg_mono1", "implicit")  # one study each (tests.dicom_node.studies.SOURCES)


@dataclass(frozen=True)
class Server:
    node: Node
    url: str
    studies: dict[str, SampleInstance]  # kind -> the one image of that kind's study
    report: SampleInstance  # a Basic Text SR in the "jpeg" study: an instance without pixels

    def client(self, root: str = ARCHIVE_ROOT) -> DICOMwebClient:
        return DICOMwebClient(url=self.url + root)


@pytest.fixture(scope="module")
def server(shared_data: Path, random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A node with its web server (DICOMweb mounted by the node's own app) holding the five radiographs, each
    its own study of a test patient (DW-0 ... DW-4), indexed."""
    folder = tmp_path_factory.mktemp("dicomweb")
    studies = [sample_study(shared_data, folder / "in" / kind, kind, patient=f"DW-{i}", accession=f"DWACC{i}",
                            date=f"2024020{i + 1}", report=kind == "jpeg") for i, kind in enumerate(KINDS)]
    node = start_web_node(folder / "node", random_model_dir)
    try:
        assert node.web is not None
        for study in studies:
            upload(node, study)  # each file in its own transfer syntax, so the compressed ones stay compressed
        wait_until(indexed(node, len(studies)), 180, "the five studies to be indexed")
        yield Server(node, node.web.url, {kind: study.instance(kind) for kind, study in zip(KINDS, studies)},
                     studies[KINDS.index("jpeg")].instance("sr"))
    finally:
        node.stop()
