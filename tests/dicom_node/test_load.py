"""Under load: concurrent associations, resends from many senders; nothing lost, nothing doubled."""
from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

from dicom_node.server import Node
from dicom_node.status import Status
from indexer.schema import Instance, State
from tests.dicom_node.builders import dx_synthetic, save
from tests.helpers import dcmtk_env, wait_until

pytestmark = pytest.mark.slow


def sender_ae() -> AE:
    ae = AE("LOADTEST")
    ae.dimse_timeout = 60
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.add_requested_context(Verification)
    return ae


def send_all(port: int, datasets: list[Dataset], acknowledged: list[str], errors: list[str],
             ready: threading.Barrier) -> None:
    """Send on one association; like a PACS, send again (on a new one) when no answer came back.

    pynetdicom's requestor can lose a response to its own reactor thread under heavy threading; a
    resend is harmless because the node stores each SOP Instance UID once.
    """
    ae = sender_ae()
    assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_NODE")
    ready.wait()
    if not assoc.is_established:
        errors.append("association refused")
        return
    for ds in datasets:
        for _ in range(3):
            if not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_NODE")
            status = assoc.send_c_store(ds)
            if status:
                if status.Status == Status.SUCCESS:
                    acknowledged.append(str(ds.SOPInstanceUID))
                else:
                    errors.append(f"status 0x{status.Status:04X}")
                break
            assoc.abort()
        else:
            errors.append("no answer after 3 attempts")
    assoc.release()


def instance_states(node: Node) -> dict[str, State]:
    with node.catalog.session() as session:
        return {row.sop_uid: row.state for row in session.query(Instance)}


def test_25_associations_times_40_instances(start_node: Callable[..., Node]) -> None:
    node = start_node(node={"max_associations": 25}, scheduler={"batch_size": 64})
    batches = [[dx_synthetic(generate_uid(), f"LOAD{a}", f"L{a}-{i}", seed=a * 100 + i) for i in range(40)]
               for a in range(25)]
    acknowledged: list[str] = []
    errors: list[str] = []
    all_connected = threading.Barrier(26)
    threads = [threading.Thread(target=send_all, args=(node.port, batch, acknowledged, errors, all_connected))
               for batch in batches]
    for thread in threads:
        thread.start()
    all_connected.wait()  # 25 associations are open now: the 26th must be refused, the node keeps serving
    extra = sender_ae().associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
    assert extra.is_rejected
    for thread in threads:
        thread.join()
    assert errors == [] and len(acknowledged) == 1000
    wait_until(lambda: all(s is State.INDEXED for s in instance_states(node).values()) and len(node.index) == 1000,
               600, "1,000 instances indexed")
    states = instance_states(node)
    assert set(states) == set(acknowledged) and len(states) == 1000
    stored = list((node.settings.node.data_dir / "storage").rglob("*.dcm"))
    assert len(stored) == 1000


@pytest.mark.parametrize("receivers", [0, 2])
def test_20_senders_resending_one_study_store_it_once(start_node: Callable[..., Node], tmp_path: Path,
                                                      receivers: int) -> None:
    """20 storescu processes at once, each sending the same 50-instance study five times over; with receiver
    processes, copies of one instance arrive in several processes at once."""
    node = start_node(node={"receivers": receivers}, scheduler={"batch_size": 64})
    if node.receivers is not None:
        wait_until(lambda: len(node.receivers.ready()) == receivers, 60, "the receivers ready")
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(50):
        ds = dx_synthetic(study, "IDEM", "IDEM1", seed=i)
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = i + 1
        files.append(save(ds, tmp_path / "study"))
    command = ["storescu", "-v", "-aet", "RESENDER", "-aec", "MMDL_NODE", "127.0.0.1", str(node.port),
               *map(str, files * 5)]
    senders = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
               for _ in range(20)]
    logs = [sender.communicate(timeout=600)[0] for sender in senders]
    assert [log.count("Received Store Response (Success)") for log in logs] == [250] * 20
    assert node.receivers is None or node.receivers.handed == 20
    wait_until(lambda: all(s is State.INDEXED for s in instance_states(node).values()) and len(node.index) == 1,
               300, "the study indexed")
    assert len(instance_states(node)) == 50
    assert len(list((node.settings.node.data_dir / "storage").rglob("*.dcm"))) == 50
    with node.catalog.session() as session:
        assert session.query(Instance).filter(Instance.vector.is_not(None)).count() == 50
    assert len(node.index) == 1  # the index holds studies: one study, one entry
