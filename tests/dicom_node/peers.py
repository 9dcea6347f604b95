"""The node's DICOM peers in tests: storescu, a pynetdicom C-FIND, and waiting until stored studies are indexed."""
from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.server import Node
from dicom_node.status import Status
from tests.helpers import dcmtk

FIND = StudyRootQueryRetrieveInformationModelFind


def storescu(node: Node, *files: Path, called: str = "MMDL_NODE") -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", "-aet", "PACS", "-aec", called, "127.0.0.1", node.port, *files)


def find(node: Node, query: Dataset, called: str = "MMDL_NODE",
         transfer_syntax: str | None = None) -> tuple[list[Dataset], Dataset]:
    """(pending identifiers, final status) of one C-FIND over pynetdicom (in ``transfer_syntax`` when given)."""
    ae = AE("VIEWER")
    ae.add_requested_context(FIND, [transfer_syntax] if transfer_syntax else None)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
    assert assoc.is_established
    answers, final = [], Dataset()
    for status, identifier in assoc.send_c_find(query, FIND):
        if status.Status == Status.PENDING:
            answers.append(identifier)
        else:
            final = status
    assoc.release()
    return answers, final


def study_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy",
                    "StudyDescription", "NumberOfStudyRelatedInstances"):
        setattr(ds, keyword, keys.get(keyword, ""))
    return ds


def indexed(node: Node, n_studies: int) -> Callable[[], bool]:
    return lambda: len(node.index) >= n_studies and not node.catalog.dirty_studies(1) \
        and not node.catalog.pending_images(1) and not node.catalog.pending_reports(1)
