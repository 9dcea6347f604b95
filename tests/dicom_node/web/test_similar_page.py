"""The similar-cases page and its JSON, served by a running node over HTTP on loopback."""
from __future__ import annotations

import base64
import io
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from dicom_node.server import Node
from dicom_node.status import Status
from dicom_node.web.similar_page import find_answer, similar_request
from tests.dicom_node.builders import dx_from_png, save, undecodable
from tests.dicom_node.web.conftest import DICOMWEB, INJECTION, OHIF, STONE, WebNode, start_web_node
from tests.helpers import dcmtk, free_port


class Rows(HTMLParser):
    """The table rows of the page: their class, data-study, image sources, links and text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.rows: list[dict[str, object]] = []
        self.scripts = 0
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script" or any(name.startswith("on") for name, _ in attrs):
            self.scripts += 1
        if tag == "tr" and values.get("data-study"):
            self.rows.append({"class": values["class"], "study": values["data-study"], "images": [], "links": {},
                              "text": ""})
        elif self.rows and tag == "img":
            self.rows[-1]["images"].append(values["src"])  # type: ignore[union-attr]
        elif self.rows and tag == "a":
            kind = (values.get("class") or "").split()[-1]
            self.rows[-1]["links"][kind] = values["href"]  # type: ignore[index]

    def handle_data(self, data: str) -> None:
        if self.rows:
            self.rows[-1]["text"] += data  # type: ignore[operator]


def test_page_lists_the_query_and_its_similar_studies(web_node: WebNode) -> None:
    query, *others = web_node.studies
    response = httpx.get(f"{web_node.url}/studies/{query.uid}/similar")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "script-src" not in response.headers["content-security-policy"]  # default-src 'none': no script runs
    rows = Rows(response.text)
    assert [r["class"] for r in rows.rows] == ["query"] + ["case"] * len(others)
    assert rows.rows[0]["study"] == query.uid
    assert sorted(r["study"] for r in rows.rows[1:]) == sorted(s.uid for s in others)  # top-k = all the others
    by_uid = {s.uid: s for s in web_node.studies}
    for rank, row in enumerate(rows.rows[1:], start=1):
        text = str(row["text"])
        study = by_uid[str(row["study"])]
        assert f"#{rank}" in text
        assert ("Same patient" in text) == (study.patient_id == query.patient_id)
        if study.patient_id != query.patient_id:  # another patient: a reference case, no identifiers
            assert "Reference case R" in text
            assert study.patient_id not in response.text and study.accession not in response.text
        assert (study.report or "no report held").split("\n")[0].split(" <")[0] in text
        assert f"2024-01-0{web_node.studies.index(study) + 1}" in text  # the study date
        links = row["links"]
        assert links == {  # type: ignore[comparison-overlap]
            "ohif": f"{OHIF}/viewer?StudyInstanceUIDs={query.uid}&StudyInstanceUIDs={study.uid}",
            "stone": f"{STONE}/index.html?study={query.uid},{study.uid}",
            "weasis": "weasis://" + quote(f'$dicom:rs --url "{DICOMWEB}" -r "studyUID={query.uid}" '
                                          f'-r "studyUID={study.uid}"', safe=""),
        }
        assert row["images"] == [f"/thumbnails/{study.sop_uid}.jpg"]
    assert query.patient_id in rows.rows[0]["text"] and query.accession in str(rows.rows[0]["text"])


def test_markup_from_dicom_text_is_shown_as_text(web_node: WebNode) -> None:
    query = web_node.studies[0]  # its StudyDescription, and study 2's report, carry markup
    page = httpx.get(f"{web_node.url}/studies/{query.uid}/similar").text
    rows = Rows(page)
    assert rows.scripts == 0
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") == 2
    assert INJECTION not in page


def test_thumbnails_are_windowed_jpegs_cached_under_the_data_dir(web_node: WebNode) -> None:
    study = web_node.studies[3]
    response = httpx.get(f"{web_node.url}/thumbnails/{study.sop_uid}.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as picture:
        assert picture.format == "JPEG" and max(picture.size) == web_node.node.settings.web.thumbnail_size
        assert picture.convert("L").getextrema()[1] > 128  # a radiograph, not a black square
    cache = web_node.node.settings.node.data_dir / "thumbnails"
    assert (cache / f"{study.sop_uid}-{web_node.node.settings.web.thumbnail_size}.jpg").is_file()
    for bad in ("1.2.3.999", "not-a-uid", "..%2F..%2Fcatalog"):
        assert httpx.get(f"{web_node.url}/thumbnails/{bad}.jpg").status_code == 404


def test_json_carries_the_same_answer(web_node: WebNode) -> None:
    query = web_node.studies[0]
    api = httpx.get(f"{web_node.url}/api/studies/{query.uid}/similar")
    negotiated = httpx.get(f"{web_node.url}/studies/{query.uid}/similar", headers={"Accept": "application/json"})
    assert api.status_code == negotiated.status_code == 200
    assert api.headers["content-type"] == "application/json"
    answer = api.json()
    assert answer == negotiated.json()
    assert answer["query"]["patient_id"] == query.patient_id and answer["query"]["case"]["study_uid"] == query.uid
    assert answer["model_version"]
    similar = answer["similar"]
    assert [c["rank"] for c in similar] == list(range(1, len(web_node.studies)))
    assert [c["score"] for c in similar] == sorted((c["score"] for c in similar), reverse=True)
    html_rows = Rows(httpx.get(f"{web_node.url}/studies/{query.uid}/similar").text).rows[1:]
    assert [c["study_uid"] for c in similar] == [r["study"] for r in html_rows]
    for case in similar:
        assert set(case["finding_scores"]) >= {f["name"] for f in case["findings"]}
        assert case["thumbnail"].startswith("/thumbnails/") and case["viewers"].keys() == {"ohif", "stone", "weasis"}
        assert (case["reference_case"] is None) == case["same_patient"]
        assert "DX" in case["modalities"]
    identifiers = {s.patient_id for s in web_node.studies[2:]} | {s.accession for s in web_node.studies[1:]}
    assert not any(identifier in api.text for identifier in identifiers)
    # every field of the answer, as dataclasses.asdict gives it (the route builds the JSON without it)
    direct = find_answer(web_node.node.services, similar_request(query.uid, "", {}), lambda uid: f"/thumbnails/{uid}.jpg")
    assert answer == json.loads(json.dumps(asdict(direct)))


def test_by_accession_number_and_options(web_node: WebNode) -> None:
    query = web_node.studies[0]
    by_accession = httpx.get(f"{web_node.url}/api/similar", params={"accession": query.accession}).json()
    assert by_accession["query"]["case"]["study_uid"] == query.uid
    page = httpx.get(f"{web_node.url}/similar", params={"accession": query.accession})
    assert page.status_code == 200 and Rows(page.text).rows[0]["study"] == query.uid
    two = httpx.get(f"{web_node.url}/api/studies/{query.uid}/similar", params={"top_k": "2"}).json()
    assert [c["rank"] for c in two["similar"]] == [1, 2]
    others = httpx.get(f"{web_node.url}/api/studies/{query.uid}/similar",
                       params={"exclude_same_patient": "yes"}).json()
    assert len(others["similar"]) == len(web_node.studies) - 2 and not any(c["same_patient"] for c in others["similar"])


@pytest.mark.parametrize(("path", "params", "status", "says"), [
    ("/studies/1.2.3.4.5.6/similar", {}, 404, "unknown study"),
    ("/similar", {"accession": "NOSUCH"}, 404, "no study held with this AccessionNumber"),
    ("/studies/abc/similar", {}, 400, "not a valid UID"),
    ("/similar", {}, 400, "name a study"),
    ("/studies/{uid}/similar", {"top_k": "0"}, 400, "top-k must be 1-100"),
    ("/studies/{uid}/similar", {"top_k": "many"}, 400, "not a number"),
    ("/studies/{uid}/similar", {"findings": "Cardiomegaly,Dragons"}, 400, "Dragons"),
    ("/studies/{uid}/similar", {"colour": "red"}, 400, "unknown query parameters: colour"),
    ("/similar", {"accession": "ACC*"}, 400, "no lists or wildcards"),
    ("/similar", {"accession": "ACC0\\ACC1"}, 400, "no lists or wildcards"),
    ("/studies/1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.25.26.27.28.29/similar", {}, 400,
     "not a valid UID"),
])
def test_bad_queries_are_answered_with_a_status_in_both_formats(web_node: WebNode, path: str, params: dict[str, str],
                                                                status: int, says: str) -> None:
    url = web_node.url + path.format(uid=web_node.studies[0].uid)
    page = httpx.get(url, params=params)
    assert page.status_code == status and says in page.text and page.headers["content-type"].startswith("text/html")
    data = httpx.get(url, params=params, headers={"Accept": "application/json"})
    assert data.status_code == status and says in data.json()["detail"]
    assert "Traceback" not in page.text + data.text


def test_a_study_held_but_not_indexed_is_409(tmp_path: Path, random_model_dir: Path, shared_data: Path) -> None:
    node = start_web_node(tmp_path / "node", random_model_dir)
    try:
        node.scheduler.shutdown()  # nothing gets embedded
        png = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[0]
        image = dx_from_png(png, "1.2.826.0.1.3680043.8.498.77", "PAT-Z", "ACCZ")
        assert dcmtk("storescu", "-aec", "MMDL_NODE", "127.0.0.1", node.port, save(image, tmp_path)).returncode == 0
        assert node.web is not None
        for accept in ("text/html", "application/json"):
            response = httpx.get(f"{node.web.url}/studies/1.2.826.0.1.3680043.8.498.77/similar",
                                 headers={"Accept": accept})
            assert response.status_code == 409 and "not indexed yet" in response.text
    finally:
        node.stop()


def test_an_image_that_cannot_be_decoded_is_422(tmp_path: Path, random_model_dir: Path, shared_data: Path) -> None:
    node = start_web_node(tmp_path / "node", random_model_dir)
    try:
        png = sorted((shared_data / "nih-cxr14-1000" / "images").glob("*.png"))[0]
        image = undecodable(dx_from_png(png, "1.2.826.0.1.3680043.8.498.78", "PAT-Y", "ACCY"))
        ae = AE("PACS")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, [JPEG2000Lossless])
        association = ae.associate("127.0.0.1", node.port, ae_title="MMDL_NODE")
        assert association.send_c_store(image).Status == Status.SUCCESS
        association.release()
        assert node.web is not None
        response = httpx.get(f"{node.web.url}/thumbnails/{image.SOPInstanceUID}.jpg")
        assert response.status_code == 422 and "cannot be rendered" in response.text
    finally:
        node.stop()


def test_no_patient_identifiers_or_report_text_in_the_logs(web_node: WebNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    query = web_node.studies[0]
    for url in (f"/studies/{query.uid}/similar", f"/api/similar?accession={query.accession}",
                "/similar?accession=NOSUCH", f"/thumbnails/{query.sop_uid}.jpg"):
        httpx.get(web_node.url + url)
    # the node's loggers and its libraries' (not the test's own HTTP client)
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "similar page" in logged
    for study in web_node.studies:
        for phi in (study.patient_id, study.patient_name, study.accession, *(study.report or "").split("\n")):
            if phi:
                assert phi not in logged
    assert "NOSUCH" not in logged


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_authentication(tmp_path: Path, random_model_dir: Path, auth: str) -> None:
    secret = "correct horse battery staple"
    node = start_web_node(tmp_path / "node", random_model_dir, auth=auth, username="reader", password=secret,
                          token=secret)
    try:
        assert node.web is not None
        url = f"{node.web.url}/studies/1.2.3.4/similar"
        good = (f"Basic {base64.b64encode(f'reader:{secret}'.encode()).decode()}" if auth == "basic"
                else f"Bearer {secret}")
        bad = [f"Basic {base64.b64encode(f'reader:{secret}x'.encode()).decode()}", f"Bearer {secret}x", "Basic !!!",
               f"Basic {base64.b64encode(f'other:{secret}'.encode()).decode()}", ""]
        for header in bad:
            refused = httpx.get(url, headers={"Authorization": header} if header else {})
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Basic" if auth == "basic" else "Bearer")
        assert httpx.get(f"{node.web.url}/thumbnails/1.2.3.jpg").status_code == 401
        assert httpx.get(url, headers={"Authorization": good}).status_code == 404  # past auth: an unknown study
    finally:
        node.stop()


def test_https_with_the_configured_certificate(tmp_path: Path, random_model_dir: Path, pki: Path) -> None:
    node = start_web_node(tmp_path / "node", random_model_dir, tls={
        "enabled": True, "certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key")})
    try:
        assert node.web is not None and node.web.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=pki / "ca.crt")
        response = httpx.get(f"{node.web.url}/studies/1.2.3.4/similar", verify=trusted)
        assert response.status_code == 404
        assert node.web.config.ssl is not None and node.web.config.ssl.minimum_version >= ssl.TLSVersion.TLSv1_2
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{node.web.port}/studies/1.2.3.4/similar", timeout=5)
    finally:
        node.stop()


def test_https_with_client_certificates(tmp_path: Path, random_model_dir: Path, pki: Path) -> None:
    node = start_web_node(tmp_path / "node", random_model_dir, tls={
        "enabled": True, "certificate": str(pki / "server.crt"), "private_key": str(pki / "server.key"),
        "ca_certificates": str(pki / "ca.crt")})
    try:
        assert node.web is not None
        url = f"{node.web.url}/studies/1.2.3.4/similar"
        for key, certificate, allowed in (("client.key", "client.crt", True), ("rogue.key", "rogue.crt", False),
                                          (None, None, False)):
            client = ssl.create_default_context(cafile=pki / "ca.crt")
            if certificate is not None:
                client.load_cert_chain(pki / certificate, pki / key)
            if allowed:
                assert httpx.get(url, verify=client).status_code == 404
            else:
                with pytest.raises(httpx.HTTPError):
                    httpx.get(url, verify=client, timeout=5)
    finally:
        node.stop()


def test_web_server_stops_and_frees_its_port(start_node: Callable[..., Node]) -> None:
    port = free_port()
    node = start_node(web={"enabled": True, "port": port})
    assert node.web is not None and httpx.get(f"http://127.0.0.1:{port}/similar").status_code == 400
    node.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/similar", timeout=2)
    again = start_node(web={"enabled": True, "port": port})  # the port is free again
    assert again.web is not None and again.web.port == port


def test_a_port_in_use_fails_the_start(start_node: Callable[..., Node]) -> None:
    first = start_node(web={"enabled": True, "port": free_port()})
    assert first.web is not None
    with pytest.raises(OSError):
        start_node(node={"port": free_port(), "data_dir": str(first.settings.node.data_dir.parent / "second")},
                   web={"enabled": True, "port": first.web.port})
