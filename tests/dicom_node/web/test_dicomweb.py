"""The DICOMweb front end, checked with a client we did not write (dicomweb-client) against a running node
holding real radiographs (the ``server`` fixture)."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicom_node.status import Status
from dicom_node.web.dicomweb import ARCHIVE_ROOT, SIMILAR_ROOT
from tests.dicom_node.studies import SampleInstance
from tests.dicom_node.web.conftest import Server


def stored_pixels(stored: SampleInstance) -> np.ndarray:
    return pydicom.dcmread(stored.file).pixel_array


def stored_frame(stored: SampleInstance) -> bytes:
    """Frame 1 as uncompressed little-endian pixels."""
    pixels = stored_pixels(stored)
    return pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()


def values(answer: Dataset | dict, keyword: str) -> object:
    ds = answer if isinstance(answer, Dataset) else Dataset.from_json(answer)
    return ds.get(keyword)


# -- QIDO-RS ---------------------------------------------------------------------------------------------
def test_study_search_matches_like_cfind(server: Server) -> None:
    client = server.client()
    everything = client.search_for_studies()
    assert {values(a, "StudyInstanceUID") for a in everything} == {s.study for s in server.studies.values()}
    j2k = server.studies["j2k"]
    by_patient = client.search_for_studies(search_filters={"PatientID": j2k.patient})
    assert [values(a, "StudyInstanceUID") for a in by_patient] == [j2k.study]
    assert values(by_patient[0], "ModalitiesInStudy") == "CR"
    assert values(by_patient[0], "NumberOfStudyRelatedInstances") == 1
    # dicomweb-client sends "Host: 127.0.0.1" without the port, so only the path is checked here (see below)
    assert str(values(by_patient[0], "RetrieveURL")).endswith(f"{ARCHIVE_ROOT}/studies/{j2k.study}")
    by_tag = client.search_for_studies(search_filters={"00080050": "DWACC*", "StudyDate": "20240202-20240203"})
    assert sorted(values(a, "AccessionNumber") for a in by_tag) == ["DWACC1", "DWACC2"]
    uid_list = client.search_for_studies(search_filters={"StudyInstanceUID": f"{j2k.study},{server.studies['jpeg'].study}"})
    assert len(uid_list) == 2
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []


def test_study_search_pages_and_includes_fields(server: Server) -> None:
    client = server.client()
    first = client.search_for_studies(limit=2, offset=0)
    rest = client.search_for_studies(limit=10, offset=2)
    assert len(first) == 2 and len(rest) == 3
    assert {values(a, "StudyInstanceUID") for a in first + rest} == {s.study for s in server.studies.values()}
    answer = requests.get(f"{server.url}{ARCHIVE_ROOT}/studies", params={"limit": 2, "fuzzymatching": "true"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/dicom+json")
    assert "additional results" in answer.headers["warning"] and "fuzzymatching" in answer.headers["warning"]
    urls = {a["00081190"]["Value"][0] for a in answer.json()}
    assert urls <= {f"{server.url}{ARCHIVE_ROOT}/studies/{s.study}" for s in server.studies.values()}
    ignored = requests.get(f"{server.url}{ARCHIVE_ROOT}/studies", params={"SeriesDate": "20240101"})
    assert len(ignored.json()) == len(server.studies) and "SeriesDate is not supported" in ignored.headers["warning"]
    below = requests.get(f"{server.url}{ARCHIVE_ROOT}/studies", params={"Modality": "MR"})  # a series key
    assert len(below.json()) == len(server.studies) and "Modality is not supported" in below.headers["warning"]
    narrow = client.search_for_studies(fields=["00180015", "PatientSex"], search_filters={"PatientID": "DW-0"})
    assert "00080060" not in narrow[0]  # Modality is a series attribute: not returned at study level
    assert {"00100040", "00180015"} <= set(narrow[0])


def test_series_and_instance_search(server: Server) -> None:
    client = server.client()
    jpeg = server.studies["jpeg_mono1"]
    series = client.search_for_series(jpeg.study)
    assert [values(s, "SeriesInstanceUID") for s in series] == [jpeg.series]
    assert values(series[0], "Modality") == "CR"
    found = client.search_for_instances(jpeg.study, jpeg.series)
    assert [values(i, "SOPInstanceUID") for i in found] == [jpeg.sop]
    assert values(found[0], "RetrieveURL").endswith(f"/instances/{jpeg.sop}")
    assert [values(i, "SOPInstanceUID") for i in client.search_for_instances(search_filters={"PatientID": "DW-2"})] \
        == [server.studies["jpeg"].sop, server.report.sop]


def test_similar_root_answers_the_dimse_ranking(server: Server) -> None:
    query = server.studies["explicit"]
    web = server.client(SIMILAR_ROOT).search_for_studies(search_filters={"StudyInstanceUID": query.study}, limit=3)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = query.study
    identifier.StudyDescription = ""
    ae = AE("VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.node.port, ae_title="MMDL_SIMILAR")
    dimse = [i for s, i in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
             if s.Status == Status.PENDING]
    assoc.release()
    assert [values(a, "StudyInstanceUID") for a in web] == [d.StudyInstanceUID for d in dimse][:3]
    assert [values(a, "StudyDescription") for a in web] == [d.StudyDescription for d in dimse][:3]
    assert query.study not in {values(a, "StudyInstanceUID") for a in web}
    assert str(values(web[0], "StudyDescription")).startswith("#1 sim ")
    by_accession = server.client(SIMILAR_ROOT).search_for_studies(search_filters={"AccessionNumber": query.accession})
    assert [values(a, "StudyInstanceUID") for a in by_accession][:3] == [values(a, "StudyInstanceUID") for a in web]
    unknown = requests.get(f"{server.url}{SIMILAR_ROOT}/studies", params={"StudyInstanceUID": "1.2.3.999"})
    assert unknown.status_code == 404
    assert requests.get(f"{server.url}{SIMILAR_ROOT}/studies", params={"PatientName": "X*"}).status_code == 400


# -- WADO-RS ---------------------------------------------------------------------------------------------
def test_series_metadata_describes_the_stored_instances(server: Server) -> None:
    client = server.client()
    for stored in server.studies.values():
        [meta] = client.retrieve_series_metadata(stored.study, stored.series)
        original = pydicom.dcmread(stored.file, stop_before_pixels=True)
        ds = Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")
        assert (ds.SOPInstanceUID, ds.Rows, ds.Columns, ds.PhotometricInterpretation) == \
               (stored.sop, original.Rows, original.Columns, original.PhotometricInterpretation)
        assert ds.AvailableTransferSyntaxUID == stored.syntax
        bulk = meta["7FE00010"]["BulkDataURI"]
        assert bulk.endswith(f"{ARCHIVE_ROOT}/studies/{stored.study}/series/{stored.series}/instances/{stored.sop}"
                             "/frames/1")
        frames = client.retrieve_bulkdata(bulk.replace("http://127.0.0.1/", server.url + "/"))
        assert frames == [stored_frame(stored)], "the pixel data's bulk data URI gives its frame"
    instance_meta = client.retrieve_instance_metadata(stored.study, stored.series, stored.sop)
    assert instance_meta["00080018"]["Value"] == [stored.sop]


def test_retrieve_instance_gives_the_stored_pixels(server: Server) -> None:
    client = server.client()
    for name, stored in server.studies.items():
        explicit = client.retrieve_instance(stored.study, stored.series, stored.sop,
                                            media_types=(("application/dicom", ExplicitVRLittleEndian),))
        assert explicit.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, name
        assert explicit.SOPInstanceUID == stored.sop, name
        assert np.array_equal(explicit.pixel_array, stored_pixels(stored)), name
        as_stored = client.retrieve_instance(stored.study, stored.series, stored.sop)  # its default: "*"
        assert as_stored.file_meta.TransferSyntaxUID == stored.syntax, name
        assert as_stored.PixelData == pydicom.dcmread(stored.file).PixelData, name
    series = client.retrieve_series(stored.study, stored.series)
    assert [ds.SOPInstanceUID for ds in series] == [stored.sop]


def test_frames_uncompressed_or_as_stored(server: Server) -> None:
    client = server.client()
    for name, stored in server.studies.items():
        [raw] = client.retrieve_instance_frames(stored.study, stored.series, stored.sop, [1],
                                                media_types=(("application/octet-stream", ExplicitVRLittleEndian),))
        assert raw == stored_frame(stored), name
        [native] = client.retrieve_instance_frames(stored.study, stored.series, stored.sop, [1],
                                                   media_types=(("application/octet-stream", "*"),))
        ds = pydicom.dcmread(stored.file)
        expected = next(generate_frames(ds.PixelData, number_of_frames=1)) if ds.file_meta.TransferSyntaxUID \
            .is_compressed else raw
        assert native == expected, name
    # OHIF's own request: unquoted type, any syntax; each part names the syntax it carries
    j2k = server.studies["j2k"]
    url = f"{server.url}{ARCHIVE_ROOT}/studies/{j2k.study}/series/{j2k.series}/instances/{j2k.sop}/frames/1"
    answer = requests.get(url, headers={"Accept": "multipart/related; type=application/octet-stream; "
                                                  "transfer-syntax=*"})
    assert answer.status_code == 200
    assert b"Content-Type: image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90\r\n" in answer.content


def test_rendered_and_thumbnail_show_the_radiograph(server: Server) -> None:
    client = server.client()
    for name, stored in server.studies.items():
        jpeg = client.retrieve_instance_rendered(stored.study, stored.series, stored.sop,
                                                 media_types=("image/jpeg",), params={"viewport": "256,256"})
        with Image.open(io.BytesIO(jpeg)) as picture:
            assert picture.format == "JPEG" and max(picture.size) == 256, name
            assert np.asarray(picture, dtype=float).std() > 20, name
    mono2 = server.studies["jpeg"]
    mono1 = server.studies["jpeg_mono1"]
    png = [client.retrieve_instance_rendered(s.study, s.series, s.sop, media_types=("image/png",))
           for s in (mono2, mono1)]
    a, b = (np.asarray(Image.open(io.BytesIO(p)), dtype=float) for p in png)
    assert np.abs((255 - b) - a).mean() < 3.0, "MONOCHROME1 is shown inverted"
    thumbnail = requests.get(f"{server.url}{ARCHIVE_ROOT}/studies/{mono2.study}/thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) == 256
    # the accept query parameter (what OHIF's thumbnails use) comes before the Accept header
    png_thumbnail = requests.get(f"{server.url}{ARCHIVE_ROOT}/studies/{mono2.study}/series/{mono2.series}"
                                 f"/instances/{mono2.sop}/thumbnail", params={"accept": "image/png"},
                                 headers={"Accept": "image/jpeg"})
    assert png_thumbnail.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png_thumbnail.content)).format == "PNG"
    assert requests.get(f"{server.url}{ARCHIVE_ROOT}/studies", params={"accept": "application/dicom+json"}).ok


def test_a_report_has_metadata_but_no_pixels(server: Server) -> None:
    report = server.report
    [meta] = server.client().retrieve_series_metadata(report.study, report.series)
    assert meta["00080018"]["Value"] == [report.sop] and "7FE00010" not in meta
    instance = f"{server.url}{ARCHIVE_ROOT}/studies/{report.study}/series/{report.series}/instances/{report.sop}"
    for resource in ("/rendered", "/thumbnail", "/frames/1"):
        answer = requests.get(instance + resource)
        assert answer.status_code == 404, (resource, answer.text)
    study = server.client().search_for_studies(search_filters={"StudyInstanceUID": report.study})
    assert values(study[0], "ModalitiesInStudy") == ["CR", "SR"]


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/studies/1.2.3.999/series", {}, 404),
    ("/studies/1.2.3.999/metadata", {}, 404),
    ("/studies/{study}/series/1.2.3.999/metadata", {}, 404),
    ("/studies/{study}/series/{series}/instances/{sop}/frames/2", {}, 404),
    ("/studies/{study}/series/{series}/instances/{sop}/frames/x", {}, 400),
    ("/studies/not-a-uid/metadata", {}, 400),
    ("/studies?limit=-1", {}, 400),
    ("/studies?NoSuchAttribute=1", {}, 400),
    ("/studies?fuzzymatching=maybe", {}, 400),
    ("/studies", {"Accept": "application/xml"}, 406),
    ("/studies/{study}/series/{series}/metadata", {"Accept": "application/dicom+xml"}, 406),
    ("/studies/{study}", {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'},
     406),
    ("/studies/{study}/series/{series}/instances/{sop}/frames/1", {"Accept": "multipart/related; type=image/jls"}, 406),
    ("/studies/{study}/series/{series}/instances/{sop}/rendered", {"Accept": "image/gif"}, 406),
])
def test_errors_are_statuses_not_tracebacks(server: Server, path: str, headers: dict[str, str], status: int) -> None:
    j2k = server.studies["j2k"]
    url = server.url + ARCHIVE_ROOT + path.format(study=j2k.study, series=j2k.series, sop=j2k.sop)
    answer = requests.get(url, headers=headers)
    assert answer.status_code == status, answer.text
    assert "Traceback" not in answer.text and answer.text
