"""The reference sheet reaches the PACS: modality -> Orthanc -> (routing) -> node, which builds the sheet of each
new study and C-STOREs it to Orthanc; Orthanc files it under the query study and gives it back over REST."""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pyorthanc
import pytest
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from dicom_node.reference_sheet import SERIES_DESCRIPTION, automatic_sheet_uid
from dicom_node.server import Node
from indexer.schema import Instance, Kind
from tests.helpers import dcmtk, free_port, wait_until
from tests.pacs.orthanc import OrthancProcess
from tests.pacs.test_orthanc import make_studies

pytestmark = pytest.mark.slow


def _orthanc_instance(client: pyorthanc.Orthanc, sop_uid: str) -> str | None:
    found = client.post_tools_find(json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    return found[0] if found else None


def test_orthanc_stores_the_sheet_of_each_new_study(tmp_path: Path, start_node: Callable[..., Node],
                                                    shared_data: Path) -> None:
    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", node_port)
    node = start_node(node={"port": node_port},
                      peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
                      reference_sheet={"for_every_new_study": True, "destination": "ORTHANC", "top_k": 2})
    client = orthanc.start()
    try:
        studies = make_studies(shared_data, tmp_path / "send", 3)
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", orthanc.dicom_port,
                     *[f for _, files in studies for f in files])
        assert sent.returncode == 0, sent.stderr
        sheets = {uid: automatic_sheet_uid(uid) for uid, _ in studies}
        wait_until(lambda: all(_orthanc_instance(client, s) for s in sheets.values()), 180,
                   "Orthanc to hold the sheet of every study")

        for study_uid, sheet_uid in sheets.items():
            instance = _orthanc_instance(client, sheet_uid)
            tags = client.get_instances_id_simplified_tags(instance)
            assert tags["StudyInstanceUID"] == study_uid and tags["SeriesDescription"] == SERIES_DESCRIPTION
            assert tags["SOPClassUID"] == SecondaryCaptureImageStorage
            original = dcmread(next(f for f in (tmp_path / "send").iterdir()
                                    if dcmread(f, stop_before_pixels=True).StudyInstanceUID == study_uid),
                               stop_before_pixels=True)
            assert tags["PatientID"] == original.PatientID
            # Orthanc files it under the query study, beside the study's own instances
            study = client.get_instances_id_study(instance)
            assert study["MainDicomTags"]["StudyInstanceUID"] == study_uid and len(study["Series"]) == 3
            # what Orthanc gives back is the node's sheet, pixel for pixel
            back = dcmread(io.BytesIO(client.get_instances_id_file(instance)))
            with node.catalog.session() as session:
                path = session.scalar(select(Instance.path).where(Instance.sop_uid == sheet_uid))
            assert back.PixelData == dcmread(node.store.absolute(path)).PixelData

        with node.catalog.session() as session:  # one sheet each, never embedded
            rows = session.execute(select(Instance.kind, Instance.vector).where(
                Instance.sop_uid.in_(list(sheets.values())))).all()
        assert len(rows) == 3 and all(kind is Kind.SHEET and vector is None for kind, vector in rows)
    finally:
        orthanc.stop()
