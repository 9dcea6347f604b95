"""Orthanc as the real PACS: storescu -> Orthanc -> (Lua auto-routing) -> node; Orthanc's own REST query to the
node's similar-case AE returns the ranked studies, and Orthanc's retrieve brings one back by C-MOVE."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyorthanc
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicom_node.server import Node
from indexer.schema import Instance, State, Study
from tests.dicom_node.builders import basic_text_sr, dx_from_png, save
from tests.helpers import dcmtk, free_port, wait_until
from tests.pacs.orthanc import OrthancProcess

pytestmark = pytest.mark.slow


def make_studies(shared_data: Path, folder: Path, count: int) -> list[tuple[str, list[Path]]]:
    """``count`` studies of one real chest X-ray (NIH CXR14 PNG as DX) and one SR report each."""
    pngs = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))
    studies = []
    for i in range(count):
        uid = generate_uid()
        files = [save(dx_from_png(pngs[i], uid, f"PACS{i}", f"PACSACC{i}"), folder),
                 save(basic_text_sr(uid, f"PACS{i}", f"PACSACC{i}", "Heart size normal.", "No acute disease."), folder)]
        studies.append((uid, files))
    return studies


def settled(node: Node) -> int:
    """Studies with a vector once nothing is pending or dirty, else -1."""
    with node.catalog.session() as session:
        busy = session.scalar(select(func.count()).select_from(Instance).where(Instance.state == State.PENDING))
        dirty = session.scalar(select(func.count()).select_from(Study).where(Study.dirty.is_(True)))
        ready = session.scalar(select(func.count()).select_from(Study).where(Study.vector.is_not(None)))
    return ready if not busy and not dirty else -1


@pytest.fixture()
def pacs(tmp_path: Path, start_node: Callable[..., Node]) -> Iterator[tuple[Node, OrthancProcess, pyorthanc.Orthanc]]:
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", node_port)
    node = start_node(node={"port": node_port},
                      peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}])
    client = orthanc.start()
    yield node, orthanc, client
    orthanc.stop()


def test_orthanc_routes_queries_and_retrieves(pacs: tuple[Node, OrthancProcess, pyorthanc.Orthanc],
                                              shared_data: Path, tmp_path: Path) -> None:
    node, orthanc, client = pacs
    studies = make_studies(shared_data, tmp_path / "send", 3)
    sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", orthanc.dicom_port,
                 *[f for _, files in studies for f in files])
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: settled(node) == 3, 120, "Orthanc to forward the three studies and the node to index them")
    # Orthanc calls with its own AE title
    assert node.metrics.registry.get_sample_value("mmdl_received_instances_total", {"calling_ae": "ORTHANC"}) == 6

    query_uid = studies[0][0]
    query = client.post_modalities_id_query("mmdl-similar", json={
        "Level": "Study",
        "Query": {"StudyInstanceUID": query_uid, "StudyDescription": "", "PatientID": "", "AccessionNumber": ""},
    })
    answers = client.get_queries_id_answers(query["ID"], params={"expand": ""})
    uids = [answer["0020,000d"]["Value"] for answer in answers]
    descriptions = [answer["0008,1030"]["Value"] for answer in answers]
    assert sorted(uids) == sorted(uid for uid, _ in studies[1:])  # the other studies, not the one asked about
    assert [d.split(" ")[0] for d in descriptions] == ["#1", "#2"]  # ranked, best first

    # the best match leaves Orthanc, then Orthanc's retrieve (C-MOVE to itself) brings it back from the node
    def orthanc_ids(study_uid: str) -> list[str]:
        return client.post_tools_find(json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})

    client.delete_studies_id(orthanc_ids(uids[0])[0])
    assert orthanc_ids(uids[0]) == []
    client.post_queries_id_answers_index_retrieve(query["ID"], "0", json={"TargetAet": "ORTHANC",
                                                                           "Synchronous": True})
    back = orthanc_ids(uids[0])
    assert len(back) == 1 and len(client.get_studies_id_instances(back[0])) == 2
