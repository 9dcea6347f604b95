"""Fixtures for node tests: a running node on a free loopback port, five sample studies as files, a storescp
peer and a PKI."""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from config import Settings, settings_from_mapping
from dicom_node.server import Node
from tests.dicom_node.builders import basic_text_sr, dx_from_png, save
from tests.helpers import dcmtk_env, free_port, wait_for_port


def node_settings(data_dir: Path, model_dir: Path, **sections: dict[str, Any]) -> Settings:
    base: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(data_dir)},
        "scheduler": {"interval_s": 0.2, "batch_size": 8},
        "model": {"path": str(model_dir), "device": "cpu"},
        "index": {"snapshot_interval_s": 3600},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return settings_from_mapping(base)


@pytest.fixture()
def start_node(tmp_path: Path, random_model_dir: Path) -> Iterator[Callable[..., Node]]:
    """Start a node on a free port; extra keyword arguments override settings sections."""
    nodes: list[Node] = []

    def start(**sections: Any) -> Node:
        node = Node(node_settings(tmp_path / "node", random_model_dir, **sections))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def studies(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """Five studies from NIH images (two share a patient), each a DX image and a Basic Text SR report; files
    only, built once for every test module that stores them."""
    folder = tmp_path_factory.mktemp("studies")
    pngs = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[:5]
    reports = [("Heart size is normal. Lungs are clear.", "No acute disease."),
               ("Enlarged cardiac silhouette.", "Cardiomegaly."),
               ("Right lower lobe airspace opacity.", "Pneumonia."),
               ("Small left pleural effusion.", "Effusion."),
               ("Heart size normal. No effusion.", "Normal chest.")]
    result = []
    for i, (png, (findings, impression)) in enumerate(zip(pngs, reports)):
        study_uid = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
        patient = "PAT-A" if i in (0, 4) else f"PAT-{i}"
        image = dx_from_png(png, study_uid, patient, f"ACC{i}")
        image.StudyDate = f"2024010{i + 1}"
        report = basic_text_sr(study_uid, patient, f"ACC{i}", findings, impression)
        report.StudyDate = image.StudyDate
        result.append({"uid": study_uid, "image": save(image, folder / str(i)), "report": save(report, folder / str(i)),
                       "patient": patient, "accession": f"ACC{i}", "sop": str(image.SOPInstanceUID)})
    return result


@pytest.fixture()
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A dcmtk storescp (AE WORKSTATION) on a free port: (its port, the folder it writes what it receives to)."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    process = subprocess.Popen(["storescp", "-aet", "WORKSTATION", "-od", str(out), "+xa", str(port)],
                               env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield port, out
    process.terminate()
    process.wait(timeout=10)


def openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate from the CA and one self-signed."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=Test CA", cwd=d)
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2",
            "-subj", "/CN=rogue", cwd=d)
    return d
