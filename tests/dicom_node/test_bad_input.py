"""Hostile and broken input over real associations: each gets the right status or rejection, the node
stays up, nothing is written outside the data directory and nothing already stored is touched.
Includes hypothesis-driven fuzzing of the C-STORE and C-FIND handlers (short here; raise
HYPOTHESIS_EXAMPLES by hand for a longer run)."""
from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicom_node.server import Node
from dicom_node.status import Status
from indexer.schema import Instance
from tests.dicom_node.builders import dx_synthetic

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "60"))
FIND = StudyRootQueryRetrieveInformationModelFind
DX = DigitalXRayImageStorageForPresentation


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> Iterator[Node]:
    from tests.dicom_node.conftest import node_settings

    node = Node(node_settings(tmp_path_factory.mktemp("bad"), random_model_dir))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def keeper(node: Node) -> tuple[str, bytes]:
    """One instance stored before the attacks; it must come through untouched."""
    ds = dx_synthetic(generate_uid(), "KEEP", "KEEP1")
    assoc = scu(node)
    assert assoc.send_c_store(ds).Status == Status.SUCCESS
    assoc.release()
    path = stored_path(node, str(ds.SOPInstanceUID))
    return str(path), path.read_bytes()


def scu(node: Node, called: str = "MMDL_NODE") -> Association:
    ae = AE("FUZZER")
    for context in (DX, ComputedRadiographyImageStorage, FIND, Verification):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
    assert assoc.is_established
    return assoc


def stored_path(node: Node, sop_uid: str) -> Path:
    with node.catalog.session() as session:
        return node.store.absolute(session.query(Instance).filter_by(sop_uid=sop_uid).one().path)


@pytest.fixture(autouse=True)
def send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's documented switch: send a file's bytes after its meta header without decoding them."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def raw_store(assoc: Association, payload: bytes, sop_class: str = DX, sop_uid: str = "1.2.3.4") -> int:
    """Send ``payload`` as the dataset of a C-STORE on the wire, whatever it is; return the status."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    header = DicomBytesIO()
    header.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(header, meta, enforce_standard=True)
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(header.getvalue() + payload)
        handle.flush()
        status = assoc.send_c_store(Path(handle.name))
    return int(status.Status)


def encoded(ds: Dataset) -> bytes:
    """The dataset's Explicit VR Little Endian encoding, without file meta."""
    ds = ds.copy()
    del ds.file_meta
    buffer = BytesIO()
    dcmwrite(buffer, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def still_serving(node: Node) -> bool:
    assoc = scu(node)
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def data_files(node: Node) -> set[Path]:
    return set(node.settings.node.data_dir.rglob("*"))


def test_truncated_garbage_and_mismatched_datasets(node: Node, keeper: tuple[str, bytes]) -> None:
    before = len(list((node.settings.node.data_dir / "storage").rglob("*.dcm")))
    good = dx_synthetic(generate_uid(), "BAD", "BAD1")
    assoc = scu(node)
    whole = encoded(good)
    # Data that cannot be understood: cut short, not DICOM at all (pydicom reads much of that without
    # complaint), an empty dataset.
    assert raw_store(assoc, whole[: len(whole) // 3]) == Status.CANNOT_UNDERSTAND
    assert raw_store(assoc, b"\xff" * 517) == Status.CANNOT_UNDERSTAND
    assert raw_store(assoc, b"This is a text file, not a DICOM dataset.\n" * 20) == Status.CANNOT_UNDERSTAND
    assert raw_store(assoc, b"\x00" * 100) == Status.CANNOT_UNDERSTAND
    assert raw_store(assoc, b"") == Status.CANNOT_UNDERSTAND
    # DICOM that is not what its context says, or lacks a UID the node needs.
    # A CR dataset on a DX presentation context.
    good.SOPClassUID = ComputedRadiographyImageStorage
    assert raw_store(assoc, encoded(good)) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    missing = dx_synthetic(generate_uid(), "BAD", "BAD2")
    del missing.SOPInstanceUID
    assert raw_store(assoc, encoded(missing)) == Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assoc.release()
    assert len(list((node.settings.node.data_dir / "storage").rglob("*.dcm"))) == before
    assert Path(keeper[0]).read_bytes() == keeper[1]
    assert still_serving(node)


def test_large_pixel_data_cut_short_is_refused(node: Node, keeper: tuple[str, bytes]) -> None:
    """Pixel data large enough to be left in the received file while it is read (not loaded) is still checked
    against the file's end: cut short it is refused; whole, the same instance is stored."""
    whole = encoded(dx_synthetic(generate_uid(), "BIG", "BIG1", size=512))  # 512 KiB of pixel data
    assoc = scu(node)
    for cut in (1, 2, 300_000):
        assert raw_store(assoc, whole[:-cut]) == Status.CANNOT_UNDERSTAND
    assert raw_store(assoc, whole) == Status.SUCCESS
    assoc.release()
    assert Path(keeper[0]).read_bytes() == keeper[1]


def test_absurd_pdu_lengths(node: Node, keeper: tuple[str, bytes]) -> None:
    rss_before = _rss_bytes()
    for pdu_type in (0x01, 0x04, 0x07, 0x55):  # A-ASSOCIATE-RQ, P-DATA-TF, A-ABORT, unknown
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFFF) + b"\x00" * 64)
    assoc = scu(node)
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"\x01" * 4096)  # on an open association too
    raw.close()
    assert still_serving(node)
    assert _rss_bytes() - rss_before < 200 * 2**20
    assert Path(keeper[0]).read_bytes() == keeper[1]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=2048), cut=st.integers(min_value=0, max_value=4000))
def test_fuzz_c_store(node: Node, keeper: tuple[str, bytes], payload: bytes, cut: int) -> None:
    """Random bytes, and real datasets cut short or with random bytes spliced in."""
    whole = encoded(dx_synthetic("1.2.3.99", "FUZZ", "FUZZ1", size=16))
    spliced = whole[:cut] + payload + whole[cut + len(payload):]
    data_dir = node.settings.node.data_dir
    files_before, beside_before = data_files(node), set(data_dir.parent.iterdir())
    assoc = scu(node)
    for candidate in (payload, spliced):
        status = raw_store(assoc, candidate)
        assert status in (Status.SUCCESS, Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                          Status.DUPLICATE_CONFLICT)
    assoc.release()
    assert set(data_dir.parent.iterdir()) == beside_before  # nothing written beside the data directory
    written = data_files(node) - files_before  # inside it: stored instances, the catalog and the index only
    assert all(p.is_relative_to(data_dir / "storage") or p.is_relative_to(data_dir / "index")
               or p.name.startswith("catalog.sqlite3") for p in written), written
    assert Path(keeper[0]).read_bytes() == keeper[1]


KEYWORDS = ["PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber", "StudyInstanceUID",
            "ModalitiesInStudy", "SeriesInstanceUID", "Modality", "SOPInstanceUID", "StudyDescription"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(level=st.sampled_from(["STUDY", "SERIES", "IMAGE", "PATIENT", "", "study", "X" * 20]),
       keys=st.dictionaries(st.sampled_from(KEYWORDS), st.text(alphabet="0123456789.*?-\\^ ABCxyz%_'\"", max_size=40),
                            max_size=5),
       called=st.sampled_from(["MMDL_NODE", "MMDL_SIMILAR"]))
def test_fuzz_c_find(node: Node, keeper: tuple[str, bytes], level: str, keys: dict[str, str], called: str) -> None:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    assoc = scu(node, called)
    statuses = [status.Status for status, _ in assoc.send_c_find(query, FIND) if status]
    assoc.release()
    assert statuses, "the node answered nothing"
    assert statuses[-1] in (Status.SUCCESS, Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, Status.UNKNOWN_STUDY,
                            Status.STUDY_NOT_INDEXED, Status.UNABLE_TO_PROCESS)
    assert all(s == Status.PENDING for s in statuses[:-1])
