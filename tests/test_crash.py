"""kill -9 during embedding and during index snapshots: after a restart, nothing acknowledged is lost,
every instance is indexed exactly once, the index answers for every study, nothing half-written stays."""
from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.similar import PRIVATE_CREATOR, PRIVATE_GROUP, TOP_K
from indexer.schema import Instance, State, Study
from tests.dicom_node.builders import dx_synthetic, save
from tests.helpers import dcmtk, dcmtk_env, free_port, wait_until
from tests.node_process import NodeProcess

pytestmark = pytest.mark.slow
FIND = StudyRootQueryRetrieveInformationModelFind


def send_studies(node: NodeProcess, folder: Path, count: int, seed: int) -> list[str]:
    files = [save(dx_synthetic(generate_uid(), f"CR{seed}-{i}", f"C{seed}-{i}", size=48, seed=seed + i), folder)
             for i in range(count)]
    result = dcmtk("storescu", "-aec", "MMDL_NODE", "127.0.0.1", node.port, *files, timeout=300)
    assert result.returncode == 0, result.stderr
    return [f.stem for f in files]


def counts(node: NodeProcess) -> tuple[int, int, int]:
    """(instances, indexed instances, studies with a vector and no pending refresh)."""
    catalog = node.catalog()
    try:
        with catalog.session() as session:
            total = session.query(Instance).count()
            done = session.query(Instance).filter(Instance.state == State.INDEXED).count()
            ready = session.query(Study).filter(Study.vector.is_not(None), Study.dirty.is_(False)).count()
        return total, done, ready
    finally:
        catalog.close()


def similar_count(node: NodeProcess, study_uid: str) -> int:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(TOP_K, "IS", "100")
    ae = AE("CHECK")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MMDL_SIMILAR")
    answers = [ident for status, ident in assoc.send_c_find(query, FIND) if status and status.Status == 0xFF00]
    assoc.release()
    return len(answers)


def check_consistent(node: NodeProcess, sent: list[str]) -> None:
    wait_until(lambda: counts(node) == (len(sent), len(sent), len(sent)), 300, "everything indexed after restart")
    catalog = node.catalog()
    with catalog.session() as session:
        held = [row.sop_uid for row in session.query(Instance)]
    catalog.close()
    assert sorted(held) == sorted(sent)  # each exactly once
    study_uid = _study_of(node, sent[0])  # the index holds every study, once it has loaded:
    wait_until(lambda: similar_count(node, study_uid) == len(sent) - 1, 60, "the index to load")
    data = node.data_dir
    assert not list(data.rglob("*.tmp")) and not list((data / "index").glob(".*"))
    assert len(list((data / "index").glob("hnsw-*.bin"))) <= 1


def _study_of(node: NodeProcess, sop_uid: str) -> str:
    catalog = node.catalog()
    try:
        with catalog.session() as session:
            return session.query(Instance).filter_by(sop_uid=sop_uid).one().series.study.study_uid
    finally:
        catalog.close()


def test_kill_9_during_embedding(tmp_path: Path, random_model_dir: Path) -> None:
    node = NodeProcess(tmp_path, random_model_dir, free_port())
    node.start()
    sent = send_studies(node, tmp_path / "send", 60, seed=1)
    wait_until(lambda: 0 < counts(node)[1] < len(sent), 120, "embedding to be under way")
    node.stop(signal.SIGKILL)
    node.start()
    check_consistent(node, sent)
    node.stop()


def test_kill_9_during_index_snapshots(tmp_path: Path, random_model_dir: Path) -> None:
    node = NodeProcess(tmp_path, random_model_dir, free_port(), extra="[index]\nsnapshot_interval_s = 0.1\n")
    rng = random.Random(7)
    sent: list[str] = []
    for round_ in range(3):
        node.start()
        sent += send_studies(node, tmp_path / f"send{round_}", 15, seed=100 * (round_ + 1))
        wait_until(lambda: counts(node)[2] >= len(sent) - 5, 120, "most studies indexed and snapshotting")
        wait_until(lambda: rng.random() < 0.3, 5, "a random moment")
        node.stop(signal.SIGKILL)
    node.start()
    check_consistent(node, sent)
    node.stop()


def acknowledged(log: str) -> list[str]:
    """The SOP Instance UIDs (file names) storescu -v was told were stored."""
    done, sending = [], ""
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            sending = Path(line.removeprefix("I: Sending file: ")).stem
        elif line.startswith("I: Received Store Response (Success)"):
            done.append(sending)
    return done


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not reaped yet by whoever adopted it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_kill_9_while_receivers_store(tmp_path: Path, random_model_dir: Path) -> None:
    """kill -9 of the node while its two receiver processes store from two senders: the receivers die with it, and
    after a restart every instance a sender was told was stored is there; resent, every instance is held once."""
    node = NodeProcess(tmp_path, random_model_dir, free_port(), receivers=2)
    node.start()
    wait_until(lambda: sum(" receiver process " in line and line.endswith(" ready")
                           for line in node.log.read_text().splitlines()) == 2, 60, "both receivers ready")
    assert node.process is not None
    receivers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(node.process.pid)], capture_output=True,
                                                    text=True).stdout.split()]
    assert len(receivers) == 2
    batches = [[save(dx_synthetic(generate_uid(), f"RK{b}-{i}", f"K{b}-{i}", size=1024, seed=1000 * b + i),
                     tmp_path / f"send{b}") for i in range(45)] for b in range(2)]
    senders = [subprocess.Popen(["storescu", "-v", "-aec", "MMDL_NODE", "127.0.0.1", str(node.port), *map(str, files)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
               for files in batches]
    wait_until(lambda: counts(node)[0] >= 10, 120, "the receivers storing")
    node.stop(signal.SIGKILL)
    logs = [sender.communicate(timeout=120)[0] for sender in senders]
    told = [uid for log in logs for uid in acknowledged(log)]
    assert 10 <= len(told) < 90, "the kill came mid-transfer"
    for pid in receivers:
        wait_until(lambda pid=pid: gone(pid), 30, f"receiver {pid} gone with the node")

    node.start()
    catalog = node.catalog()
    with catalog.session() as session:
        held = {row.sop_uid: row.path for row in session.query(Instance)}
    catalog.close()
    assert set(told) <= set(held)
    assert all((node.data_dir / "storage" / path).is_file() for path in held.values())
    sent = [path.stem for files in batches for path in files]
    for files in batches:  # the senders send again what they sent, as a PACS retries a failed job
        result = dcmtk("storescu", "-aec", "MMDL_NODE", "127.0.0.1", node.port, *files, timeout=300)
        assert result.returncode == 0, result.stderr
    check_consistent(node, sent)
    node.stop()
