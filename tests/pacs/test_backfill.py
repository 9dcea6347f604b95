"""`mmdl-node backfill`: Orthanc holds studies before the node starts; the command (a subprocess, the real CLI)
crawls Orthanc's REST API, then any PACS over DIMSE (Orthanc's DICOM port), indexes all, and re-sends nothing."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.server import Node
from tests.dicom_node.builders import dx_synthetic, save
from tests.helpers import dcmtk, free_port, wait_until
from tests.pacs.orthanc import OrthancProcess
from tests.pacs.test_orthanc import settled

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]


def backfill(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "backfill", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


def summary(result: subprocess.CompletedProcess[str]) -> tuple[int, int, int, int, int]:
    """(done, listed, sent, held, failed) from the final line."""
    match = re.search(r"(\d+)/(\d+) studies \((\d+) sent, (\d+) already held, (\d+) failed\)", result.stdout)
    assert match, result.stdout + result.stderr
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def test_backfill_from_orthanc_rest_then_dimse_resumes_without_resending(
        tmp_path: Path, start_node: Callable[..., Node]) -> None:
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", node_port, route=False)
    orthanc.start()
    try:
        files, recent = [], []
        for i in range(6):
            uid = generate_uid()
            ds = dx_synthetic(uid, f"BF{i}", f"BFACC{i}", size=64, seed=i)
            if i == 5:
                ds.StudyDate = "20230101"  # outside the first run's date range
            else:
                recent.append(uid)
            files += [save(ds, tmp_path / "send"), save(dx_synthetic(uid, f"BF{i}", f"BFACC{i}", size=64, seed=10 + i),
                                                        tmp_path / "send")]
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", orthanc.dicom_port, *files)
        assert sent.returncode == 0, sent.stderr

        node = start_node(node={"port": node_port})  # starts after Orthanc holds the studies
        config = tmp_path / "backfill.toml"
        config.write_text(f"""
[node]
data_dir = "{node.settings.node.data_dir}"
[backfill]
source = "orthanc"
orthanc_url = "{orthanc.url}"
orthanc_node_modality = "mmdl"
modalities = ["DX"]
studies_per_s = 50
concurrency = 2
""")
        # a slow run (1 study/s) stopped with Ctrl-C after its first study, then resumed
        config.write_text(config.read_text().replace("studies_per_s = 50", "studies_per_s = 1"))
        slow = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "backfill", "--config", str(config),
                                 "--from", "20240101"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert slow.stderr is not None
        progress_line = ""
        while not progress_line.startswith("backfill:"):  # printed as studies complete (at most once a second)
            progress_line = slow.stderr.readline()
            assert progress_line, "backfill ended before any progress"
        assert re.search(r"backfill: \d/5 studies .* studies/s, ETA", progress_line), progress_line
        slow.send_signal(signal.SIGINT)
        out, _ = slow.communicate(timeout=120)
        assert slow.returncode == 1 and "(stopped: run again to resume)" in out
        done_before = sum(node.catalog.study_instance_count(uid) == 2 for uid in recent)
        assert 1 <= done_before < 5

        config.write_text(config.read_text().replace("studies_per_s = 1", "studies_per_s = 50"))
        first = backfill(config, "--from", "20240101")
        assert first.returncode == 0, first.stderr
        assert summary(first) == (5, 5, 5 - done_before, done_before, 0)  # resumed: nothing sent twice
        assert all(node.catalog.study_instance_count(uid) == 2 for uid in recent)

        again = backfill(config, "--from", "20240101")
        assert summary(again) == (5, 5, 0, 5, 0)  # a second run sends nothing

        dimse = config.read_text().replace('source = "orthanc"', 'source = "dimse"') + \
            f'[backfill.pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        config.write_text(dimse)
        over_dimse = backfill(config)  # no date filter: the older study too, the others are held
        assert over_dimse.returncode == 0, over_dimse.stderr
        assert summary(over_dimse) == (6, 6, 1, 5, 0)
        wait_until(lambda: settled(node) == 6, 120, "the six backfilled studies to be indexed")
    finally:
        orthanc.stop()
