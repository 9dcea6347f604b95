"""Running nodes holding real chest X-ray studies stored over DICOM: one with its web server (the similar-cases
page), one holding radiographs in every encoding (uncompressed, JPEG 2000, JPEG baseline, MONOCHROME1, Implicit VR)
for the DICOMweb and OHIF tests."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from starlette.applications import Starlette

from dicom_node.server import Node
from dicom_node.status import Status
from dicom_node.web.dicomweb import ARCHIVE_ROOT, routes
from dicom_node.web.render import Renderer
from tests.dicom_node.builders import ROOT, basic_text_sr, dx_from_png, save
from tests.dicom_node.conftest import node_settings
from tests.dicom_node.test_node import indexed
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

SOURCES = {  # name: (file under ../shared/data/dicom, what it exercises)
    "uncompressed": "pydicom-data_WG04_RG1/RG1_UNCR.dcm",  # 15-bit MONOCHROME1, Explicit VR LE
    "j2k": "pydicom-data_WG04_RG1/RG1_J2KR.dcm",  # JPEG 2000 lossless
    "jpeg": "torchxrayvision_tests/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",  # JPEG baseline
    "jpeg_mono1": "torchxrayvision_tests/derived_not_real/Fake_MONOHR1.dcm",  # MONOCHROME1 relabelled
    "implicit": "fo-dicom/CR-MONO1-10-chest",  # no Part 10 header: Implicit VR LE, 10-bit MONOCHROME1
}


@dataclass(frozen=True)
class Stored:
    study: str
    series: str
    sop: str
    file: Path
    syntax: str
    patient: str
    accession: str


@dataclass(frozen=True)
class Server:
    node: Node
    url: str
    studies: dict[str, Stored]
    report: Stored  # a Basic Text SR in the "jpeg" study: an instance without pixels

    def client(self, root: str = ARCHIVE_ROOT) -> DICOMwebClient:
        return DICOMwebClient(url=self.url + root)


def relabelled(source: Path, folder: Path, index: int) -> Stored:
    """The real file under new UIDs and a test patient (the five sources share two studies)."""
    ds = pydicom.dcmread(source, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid(prefix=ROOT) for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.AccessionNumber, ds.StudyDate = f"DW-{index}", f"DWACC{index}", f"2024020{index + 1}"
    if [float(v) for v in ds.get("PixelSpacing", [1])] == [0.0, 0.0]:
        del ds.PixelSpacing  # WG04 RG1 says 0\0: a zero-sized pixel, which OHIF's renderer draws as nothing
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{index}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Stored(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path,
                  str(ds.file_meta.TransferSyntaxUID), ds.PatientID, ds.AccessionNumber)


@pytest.fixture(scope="module")
def server(shared_data: Path, random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A node holding the five radiographs, indexed, its DICOMweb routes served by uvicorn on a free port."""
    folder = tmp_path_factory.mktemp("dicomweb")
    studies = {name: relabelled(shared_data / "dicom" / source, folder / "in", i)
               for i, (name, source) in enumerate(SOURCES.items())}
    jpeg = studies["jpeg"]
    sr = basic_text_sr(jpeg.study, jpeg.patient, jpeg.accession, "Heart size normal.", "No acute disease.")
    sr_file = save(sr, folder / "in")
    report = Stored(jpeg.study, sr.SeriesInstanceUID, sr.SOPInstanceUID, sr_file, ExplicitVRLittleEndian,
                    jpeg.patient, jpeg.accession)
    node = Node(node_settings(folder / "node", random_model_dir))
    node.start()
    try:
        store(node, [s.file for s in studies.values()] + [sr_file])
        wait_until(lambda: len(node.index) == len(studies) and not node.catalog.dirty_studies(1)
                   and not node.catalog.pending_images(1) and not node.catalog.pending_reports(1), 180,
                   "the five studies to be indexed")
        app = Starlette(routes=routes(node.services, Renderer(node.store, folder / "thumbnails")))
        port = free_port()
        web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=web.run, daemon=True)
        thread.start()
        wait_until(lambda: web.started, 30, "uvicorn to start")
        yield Server(node, f"http://127.0.0.1:{port}", studies, report)
        web.should_exit = True
        thread.join(30)
    finally:
        node.stop()


def store(node: Node, files: list[Path]) -> None:
    """C-STORE each file in its own transfer syntax (so the compressed ones are kept compressed)."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE("PACS")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == Status.SUCCESS
    finally:
        assoc.release()
