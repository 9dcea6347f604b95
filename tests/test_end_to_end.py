"""End to end: `mmdl-node serve` as a subprocess, dcmtk tools as PACS, viewer and workstation.

Also the crash test: kill -9 while storescu sends; after a restart every acknowledged instance is on
disk, in the catalog and indexed exactly once, and nothing half-written remains.
"""
from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from indexer.schema import Instance, State, Study
from tests.dicom_node.builders import basic_text_sr, dx_from_png, save
from tests.helpers import dcmtk, dcmtk_env, free_port, wait_for_port, wait_until
from tests.node_process import NodeProcess

pytestmark = pytest.mark.slow


@pytest.fixture()
def workstation(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port, out = free_port(), tmp_path / "workstation"
    out.mkdir()
    process = subprocess.Popen(["storescp", "-aet", "WORKSTATION", "-od", str(out), str(port)],
                               env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    yield port, out
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture()
def node(tmp_path: Path, random_model_dir: Path, workstation: tuple[int, Path]) -> Iterator[NodeProcess]:
    process = NodeProcess(tmp_path, random_model_dir, workstation[0])
    process.start()
    yield process
    process.stop()


def make_studies(shared_data: Path, folder: Path, count: int, with_reports: bool = True) -> list[tuple[str, list[Path]]]:
    pngs = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))
    studies = []
    for i in range(count):
        uid = generate_uid()
        files = [save(dx_from_png(pngs[i % len(pngs)], uid, f"PAT{i}", f"E2E{i}"), folder)]
        if with_reports:
            files.append(save(basic_text_sr(uid, f"PAT{i}", f"E2E{i}", "Lungs are clear.", "Normal."), folder))
        studies.append((uid, files))
    return studies


def indexed_studies(node: NodeProcess) -> int:
    catalog = node.catalog()
    try:
        with catalog.session() as session:
            pending = session.query(Instance).filter(Instance.state == State.PENDING).count()
            dirty = session.query(Study).filter(Study.dirty.is_(True)).count()
            ready = session.query(Study).filter(Study.vector.is_not(None)).count()
        return ready if pending == 0 and dirty == 0 else -1
    finally:
        catalog.close()


def test_store_index_query_and_move(node: NodeProcess, shared_data: Path, tmp_path: Path,
                                    workstation: tuple[int, Path]) -> None:
    studies = make_studies(shared_data, tmp_path / "send", 4)
    sent = dcmtk("storescu", "-aet", "PACS", "-aec", "MMDL_NODE", "127.0.0.1", node.port,
                 *[f for _, files in studies for f in files])
    assert sent.returncode == 0, sent.stderr
    stored_at = time.monotonic()
    wait_until(lambda: indexed_studies(node) == 4, 180, "the four studies to be indexed")
    answers_dir = tmp_path / "answers"
    answers_dir.mkdir()

    def similar() -> list:
        for old in answers_dir.iterdir():
            old.unlink()
        dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "MMDL_SIMILAR", "-X", "-od", answers_dir,
              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies[0][0]}",
              "-k", "StudyDescription", "-k", "PatientID", "-k", "AccessionNumber", "-k", "ModalitiesInStudy",
              "127.0.0.1", node.port)
        return [dcmread(p) for p in sorted(answers_dir.glob("rsp*.dcm"))]

    answers = similar()
    freshness = time.monotonic() - stored_at
    print(f"\nC-STORE success to similar-case answer: {freshness:.2f} s")
    assert len(answers) == 3
    assert {a.StudyInstanceUID for a in answers} == {uid for uid, _ in studies[1:]}
    assert all(re.match(r"#\d sim -?\d\.\d\d: ", a.StudyDescription) for a in answers)
    assert all(list(a.ModalitiesInStudy) == ["DX", "SR"] for a in answers)

    best = answers[0].StudyInstanceUID
    moved = dcmtk("movescu", "-S", "-aet", "VIEWER", "-aem", "WORKSTATION", "-aec", "MMDL_SIMILAR",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={best}", "127.0.0.1", node.port)
    assert moved.returncode == 0, moved.stderr
    received = [dcmread(p) for p in workstation[1].iterdir()]
    assert {r.StudyInstanceUID for r in received} == {best} and {r.Modality for r in received} == {"DX", "SR"}


def acknowledged(storescu_log: str, sops: dict[str, str]) -> set[str]:
    """SOP Instance UIDs whose C-STORE got a success status, from storescu's verbose log."""
    done, current = set(), None
    for line in storescu_log.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            done.add(sops[current])
            current = None
    return done


def test_kill_9_while_receiving_loses_nothing_acknowledged(tmp_path: Path, random_model_dir: Path,
                                                           shared_data: Path, workstation: tuple[int, Path]) -> None:
    node = NodeProcess(tmp_path, random_model_dir, workstation[0])
    node.start()
    studies = make_studies(shared_data, tmp_path / "send", 80, with_reports=False)
    files = [f for _, fs in studies for f in fs]
    sops = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    sender = subprocess.Popen(["storescu", "-v", "-aet", "PACS", "-aec", "MMDL_NODE", "127.0.0.1", str(node.port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
    assert sender.stdout is not None
    log_lines = []
    for line in sender.stdout:
        log_lines.append(line)
        if sum("Received Store Response (Success)" in x for x in log_lines) == 25:
            node.stop(signal.SIGKILL)
            break
    log_lines.extend(sender.stdout.readlines())
    sender.wait(timeout=60)
    acked = acknowledged("".join(log_lines), sops)
    assert 25 <= len(acked) < len(files)

    node.start()
    wait_until(lambda: indexed_studies(node) >= len(acked), 240, "acknowledged instances to be indexed")
    catalog = node.catalog()
    with catalog.session() as session:
        rows = {r.sop_uid: r for r in session.query(Instance)}
        for sop in acked:
            row = rows[sop]
            assert row.state is State.INDEXED
            assert dcmread(node.data_dir / "storage" / row.path).SOPInstanceUID == sop
        assert session.query(Study).filter(Study.vector.is_not(None)).count() == len(rows)
    catalog.close()
    assert not list((node.data_dir / "storage" / ".incoming").glob("*.dcm"))  # the partial receive was removed
    node.stop()
