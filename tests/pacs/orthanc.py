"""Debian's Orthanc as a real PACS on loopback: its own generated config, free ports, a temp storage folder."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyorthanc
import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import free_port, wait_until

PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")  # Debian's orthanc-python
SIMILAR_BUTTON = REPO_ROOT / "scripts" / "orthanc_similar_cases.py"

# Orthanc's auto-routing rule: every stable study goes to the node, except what came from the node itself
# (a study retrieved from the node by C-MOVE must not be sent back). Kept in sync with the README.
ROUTING_LUA = """
function OnStableStudy(studyId, tags, metadata)
  local instances = ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))
  local origin = RestApiGet('/instances/' .. instances[1]['ID'] .. '/metadata/RemoteAET')
  if origin ~= 'MMDL_NODE' and origin ~= 'MMDL_SIMILAR' then
    RestApiPost('/modalities/mmdl/store', '{"Resources": ["' .. studyId .. '"], "Asynchronous": true}')
  end
end
"""


class OrthancProcess:
    """`Orthanc CONFIG` with the node registered under both AE titles; ``route`` adds the Lua rule;
    ``similar_page`` (the node's web URL) loads the repo's "Similar cases" Python plugin."""

    def __init__(self, folder: Path, node_port: int, route: bool = True, similar_page: str | None = None) -> None:
        if shutil.which("Orthanc") is None:
            pytest.fail("Orthanc not installed: apt-get install -y orthanc (.ci/run does)")
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "mmdl-test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "StableAge": 1,
            "SaveJobs": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                "mmdl": ["MMDL_NODE", "127.0.0.1", node_port],
                "mmdl-similar": ["MMDL_SIMILAR", "127.0.0.1", node_port],
            },
        }
        if similar_page is not None:
            if not PYTHON_PLUGIN.is_file():
                pytest.fail("orthanc-python not installed: apt-get install -y orthanc-python (.ci/run does)")
            config.update(Plugins=[str(PYTHON_PLUGIN)], PythonScript=str(SIMILAR_BUTTON),
                          MmdlSimilar={"PageUrl": similar_page})
        if route:
            (folder / "route.lua").write_text(ROUTING_LUA)
            config["LuaScripts"] = [str(folder / "route.lua")]
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = folder / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> pyorthanc.Orthanc:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        client = pyorthanc.Orthanc(self.url)
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with {process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return bool(client.get_system())
            except Exception:
                return False

        wait_until(ready, 60, "Orthanc to answer over HTTP")
        return client

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
