"""Fixtures for node tests: a small random MMDL model and a running node on a free loopback port."""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings, settings_from_mapping
from dicom_node.server import Node
from tests.helpers import free_port


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
