"""`bench populate`: synthetic studies the node starts on and answers from, never mixed with real ones."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from sqlalchemy import func, select

from dicom_node.server import Node
from dicom_node.status import Status
from indexer.catalog import Catalog, InstanceAttrs, SeriesAttrs, StudyAttrs
from bench.populate import SYNTHETIC_ROOT, RealStudiesError, populate, synthetic_uid
from indexer.schema import Kind, Study
from tests.dicom_node.conftest import node_settings
from tests.helpers import wait_until


def similar(port: int, study_uid: str) -> list[Dataset]:
    ae = AE("VIEWER")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="MMDL_SIMILAR")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    answers = [i for s, i in assoc.send_c_find(query, FIND) if s and s.Status == Status.PENDING]
    assoc.release()
    return answers


def test_node_starts_on_a_populated_data_dir_and_answers(tmp_path: Path, random_model_dir: Path) -> None:
    settings = node_settings(tmp_path / "node", random_model_dir)
    assert populate(settings, 2000)["studies"] == 2000
    assert populate(settings, 500)["studies"] == 2500  # appends, and the snapshot is caught up
    node = Node(settings)
    node.start()
    try:
        wait_until(lambda: node.index.ready, 60, "the index to load")
        assert len(node.index) == 2500
        with node.catalog.session() as session:
            assert session.scalar(select(func.count()).where(Study.synthetic.is_(True))) == 2500
        answers = similar(node.port, synthetic_uid(1))
        assert len(answers) == 10
        assert all(str(a.StudyInstanceUID).startswith(SYNTHETIC_ROOT + ".") for a in answers)
        assert synthetic_uid(1) not in {str(a.StudyInstanceUID) for a in answers}
    finally:
        node.stop()


def test_refuses_a_catalog_with_real_studies(tmp_path: Path, random_model_dir: Path) -> None:
    settings = node_settings(tmp_path / "node", random_model_dir)
    settings.node.data_dir.mkdir(parents=True)
    catalog = Catalog(settings.catalog_url)
    catalog.add_instance(StudyAttrs("1.2.3"), SeriesAttrs("1.2.3.1"),
                         InstanceAttrs("1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1",
                                       "a.dcm", 10, Kind.IMAGE))
    catalog.close()
    with pytest.raises(RealStudiesError, match="1 real studies"):
        populate(settings, 10)


def test_cli_command_populates_the_configured_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    config = tmp_path / "bench.toml"
    config.write_text('[node]\ndata_dir = "data"\n')
    assert main(["bench", "populate", "--config", str(config), "--count", "50", "--clusters", "5"]) == 0
    assert "50 studies indexed" in capsys.readouterr().out
    assert (tmp_path / "data" / "index" / "current.json").is_file()
