"""/health, /metrics and `mmdl-node status` against a running node fed by storescu, findscu and mllp_send."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from dicom_node.server import Node
from indexer.schema import Instance
from tests.dicom_node.builders import dx_synthetic, save
from tests.dicom_node.test_hl7 import mllp_send, oru
from tests.helpers import dcmtk, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = get(f"http://127.0.0.1:{port}/metrics")[1].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def status(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_health_metrics_and_status(start_node: Callable[..., Node], tmp_path: Path) -> None:
    http_port = free_port()
    node = start_node(metrics={"enabled": True, "host": "127.0.0.1", "port": http_port},
                      hl7={"enabled": True, "host": "127.0.0.1", "port": free_port()})
    wait_until(lambda: node.index.ready, 30, "the (empty) index to load")
    code, body = get(f"http://127.0.0.1:{http_port}/health")
    assert code == 200 and json.loads(body) == {"status": "ok", "dicom": True, "catalog": True, "index": "ready"}

    study_uid = generate_uid()
    files = [save(dx_synthetic(study_uid, "SECRET-PID", "SECRETACC", size=64, seed=i), tmp_path) for i in range(2)]
    sent = dcmtk("storescu", "-aet", "MODALITY_A", "-aec", "MMDL_NODE", "127.0.0.1", node.port, *files)
    assert sent.returncode == 0, sent.stderr
    assert node.hl7 is not None
    assert mllp_send(node.hl7.port, oru("M1", accession="SECRETACC", findings="Secret findings text."),
                     "not hl7", folder=tmp_path)[1][0] == "AR"
    def settled() -> bool:
        values = samples(http_port)
        return values[("mmdl_embedded_total", (("kind", "report"),))] == 1 and \
            values[("mmdl_pending", (("kind", "image"),))] == 0 and values[("mmdl_index_size", ())] == 1

    wait_until(settled, 120, "the study and its report to be indexed")
    found = dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_SIMILAR", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", node.port)
    assert found.returncode == 0, found.stderr
    dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_SIMILAR", "-k", "QueryRetrieveLevel=STUDY",
          "-k", "StudyInstanceUID=1.2.3.404", "127.0.0.1", node.port)

    values = samples(http_port)
    with node.catalog.session() as session:
        stored_bytes = sum(instance.size_bytes for instance in session.query(Instance))
    assert values[("mmdl_received_instances_total", (("calling_ae", "MODALITY_A"),))] == 2
    assert values[("mmdl_received_bytes_total", (("calling_ae", "MODALITY_A"),))] == stored_bytes
    assert values[("mmdl_embedded_total", (("kind", "image"),))] == 2
    assert values[("mmdl_embedded_total", (("kind", "report"),))] == 1
    assert values[("mmdl_pending", (("kind", "image"),))] == 0
    assert values[("mmdl_failures_total", (("reason", "hl7_ar"),))] == 1
    assert values[("mmdl_hl7_messages_total", (("ack", "AA"),))] == 1
    assert values[("mmdl_query_seconds_count", (("kind", "similar"),))] == 2
    assert values[("mmdl_failures_total", (("reason", "similar_unknown_study"),))] == 1
    text = get(f"http://127.0.0.1:{http_port}/metrics")[1].decode()
    assert "SECRET" not in text and "Secret" not in text  # no patient IDs, accession numbers or report text

    config = tmp_path / "node.toml"
    data_dir = node.settings.node.data_dir
    config.write_text(f'[node]\ndata_dir = "{data_dir}"\n[metrics]\nenabled = true\nhost = "127.0.0.1"\n'
                      f"port = {http_port}\n")
    live = status(config)
    assert live.returncode == 0, live.stderr
    assert "(live node)" in live.stdout and "received from MODALITY_A: 2 instances" in live.stdout
    assert "index: 1 studies (ready)" in live.stdout and "failures hl7_ar: 1" in live.stdout

    node.stop()
    down = status(config)
    assert down.returncode == 1
    assert "node not reachable" in down.stdout and "received from MODALITY_A: 2 instances" in down.stdout
    assert "index: 1 studies with a vector" in down.stdout and "SECRET" not in down.stdout


def test_health_is_503_when_the_dicom_server_is_down(start_node: Callable[..., Node]) -> None:
    http_port = free_port()
    node = start_node(metrics={"enabled": True, "host": "127.0.0.1", "port": http_port})
    assert node._server is not None
    node._server.shutdown()  # the DICOM listener stops; the HTTP port stays
    node._server.socket.close()
    code, body = get(f"http://127.0.0.1:{http_port}/health")
    assert code == 503 and json.loads(body)["dicom"] is False
    node._server = None
