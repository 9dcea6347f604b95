"""`mmdl-node serve` as a subprocess on a free port, for end-to-end, crash and privacy tests."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.catalog import Catalog
from tests.helpers import free_port, port_open, wait_until

MMDL_NODE = Path(sys.executable).parent / "mmdl-node"


class NodeProcess:
    """`mmdl-node serve --config FILE` on a temp data dir, on a free port."""

    started: list["NodeProcess"] = []  # killed after each test (tests/conftest.py), even a failed one

    def __init__(self, folder: Path, model_dir: Path, peer_port: int, extra: str = "", receivers: int = 0) -> None:
        self.port = free_port()
        self.data_dir = folder / "data"
        self.config = folder / "node.toml"
        self.config.write_text(f"""
[node]
host = "127.0.0.1"
port = {self.port}
data_dir = "{self.data_dir}"
receivers = {receivers}

[[peers]]
ae_title = "WORKSTATION"
host = "127.0.0.1"
port = {peer_port}

[scheduler]
interval_s = 0.5

[model]
path = "{model_dir}"
device = "cpu"
{extra}
""")
        self.log = folder / "node.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([str(MMDL_NODE), "serve", "--config", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)
        NodeProcess.started.append(self)
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"mmdl-node exited with {process.returncode}:\n{self.log.read_text()[-3000:]}")
            return port_open(self.port)

        wait_until(ready, 120, f"mmdl-node to listen on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=60)

    def catalog(self) -> Catalog:
        return Catalog(f"sqlite:///{self.data_dir / 'catalog.sqlite3'}")
