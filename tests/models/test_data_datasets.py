"""Dataset readers on tiny fixtures of each layout, the manifest round trip, and the patient split."""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.datasets import (
    findings_and_impression,
    iter_iu_reports,
    read_chexpert,
    read_covid,
    read_iu_reports,
    read_manifest,
    read_mimic,
    read_nih,
    split_by_patient,
    write_manifest,
)
from models.errors import ModelError
from models.observations import OBSERVATIONS, Sample


def vec(*names: str) -> tuple[int, ...]:
    return tuple(int(n in names) for n in OBSERVATIONS)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    image = tmp_path / "img" / "a.png"
    image.write_bytes(b"")
    samples = [
        Sample("p1", "s1", "nih", image=image, labels=vec("Cardiomegaly", "Pleural Effusion")),
        Sample("p2", "s2", "iu", report='Line one, with "quotes".\nLine two.', labels=(0,) * 14),
        Sample("p3", "s3", "covid", image=image, report="note", labels=None),
    ]
    write_manifest(samples, tmp_path / "out" / "manifest.csv")
    text = (tmp_path / "out" / "manifest.csv").read_text()
    assert "../img/a.png" in text and "Cardiomegaly|Pleural Effusion" in text
    assert read_manifest(tmp_path / "out" / "manifest.csv") == samples


def test_manifest_minimal_columns_and_relative_images(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "m.csv",
        [
            {"image": "images/x.png", "report": "", "labels": "Pneumonia|Lung Opacity"},
            {"image": "", "report": "Small effusion.", "labels": "-"},
            {"image": "images/y.png", "report": "", "labels": ""},
        ],
    )
    first, second, third = read_manifest(path)
    assert first.image == tmp_path / "images" / "x.png"
    assert first.labels == vec("Pneumonia", "Lung Opacity")
    assert first.patient_id == first.study_id == "images/x.png"  # fallbacks
    assert second.labels == (0,) * 14 and second.image is None and second.study_id == "row3"
    assert third.labels is None


def test_manifest_errors_name_the_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", [{"image": "a.png", "report": "", "labels": "Cardiomegaly"},
                                         {"image": "b.png", "report": "", "labels": "Heart Attack"}])  # fmt: skip
    with pytest.raises(ModelError, match=r"m\.csv:3.*'Heart Attack'"):
        read_manifest(path)
    empty = write_csv(tmp_path / "e.csv", [{"image": "", "report": "", "labels": "-"}])
    with pytest.raises(ModelError, match=r"e\.csv:2.*neither an image nor a report"):
        read_manifest(empty)
    wrong = write_csv(tmp_path / "w.csv", [{"path": "a.png", "labels": "-"}])
    with pytest.raises(ModelError, match="missing column.*image"):
        read_manifest(wrong)


def test_manifest_refuses_uncertain_labels(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="binary"):
        write_manifest([Sample("p", "s", "x", report="r", labels=(-1,) + (0,) * 13)], tmp_path / "m.csv")


# ---------------------------------------------------------------- IU


def iu_xml(uid: str, findings: str, impression: str, mesh: list[str]) -> bytes:
    tags = "".join(f"<major>{m}</major>" for m in mesh)
    return (
        f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>'
        f'<AbstractText Label="COMPARISON">None.</AbstractText>'
        f'<AbstractText Label="INDICATION">XXXX-year-old with cough</AbstractText>'
        f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
        f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
        f"</Abstract></Article></MedlineCitation><MeSH>{tags}<automatic>x</automatic></MeSH></eCitation>"
    ).encode()


@pytest.fixture
def iu_tgz(tmp_path: Path) -> Path:
    path = tmp_path / "NLMCXR_reports.tgz"
    files = {
        "ecgen-radiology/2.xml": iu_xml("CXR2", "Small left pleural effusion. No pneumothorax.", "Effusion.",
                                        ["Pleural Effusion/left/small"]),
        "ecgen-radiology/1.xml": iu_xml("CXR1", "The heart is normal in size. Lungs are clear.",
                                        "Normal chest x-XXXX.", ["normal"]),
        "ecgen-radiology/3.xml": iu_xml("CXR3", "", "", ["No Indexing"]),
    }  # fmt: skip
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_iter_iu_reports(iu_tgz: Path) -> None:
    reports = list(iter_iu_reports(iu_tgz))
    assert [r.uid for r in reports] == ["CXR1", "CXR2", "CXR3"]
    assert reports[1].mesh_major == ("Pleural Effusion/left/small",)
    assert reports[1].text == "Small left pleural effusion. No pneumothorax.\nEffusion."
    assert "cough" not in reports[0].text  # INDICATION is not part of the text


def test_read_iu_reports(iu_tgz: Path) -> None:
    samples = read_iu_reports(iu_tgz)
    assert [s.study_id for s in samples] == ["CXR1", "CXR2"]  # the empty report is skipped
    assert samples[0].labels == vec("No Finding")
    assert samples[1].labels == vec("Pleural Effusion")
    assert samples[1].patient_id == "iu:CXR2" and samples[1].image is None and samples[1].source == "iu"


def test_iu_bad_archive(tmp_path: Path) -> None:
    bad = tmp_path / "x.tgz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(ModelError, match="tar"):
        list(iter_iu_reports(bad))
    with pytest.raises(ModelError, match="not found"):
        list(iter_iu_reports(tmp_path / "missing.tgz"))


# ---------------------------------------------------------------- NIH and COVID


def test_read_nih_mapping(tmp_path: Path) -> None:
    blank = {"google2019_fracture": "", "google2019_pneumothorax": "", "google2019_airspace_opacity": "",
             "google2019_nodule_or_mass": ""}  # fmt: skip
    write_csv(
        tmp_path / "labels.csv",
        [
            {"image": "images/a.png", "labels": "No Finding", "patient_id": "7", **blank},
            {"image": "images/b.png", "labels": "Effusion|Infiltration|Mass", "patient_id": "8", **blank},
            {"image": "images/c.png", "labels": "Emphysema", "patient_id": "8", **blank},
            {"image": "images/d.png", "labels": "Infiltration", "patient_id": "9", **blank,
             "google2019_airspace_opacity": "NO", "google2019_fracture": "YES"},
        ],
    )  # fmt: skip
    a, b, c, d = read_nih(tmp_path)
    assert a.labels == vec("No Finding") and a.patient_id == "nih:7" and a.image == tmp_path / "images/a.png"
    assert b.labels == vec("Pleural Effusion", "Lung Opacity", "Lung Lesion")
    assert c.labels == (0,) * 14  # Emphysema has no CheXpert counterpart
    assert d.labels == vec("Fracture")  # Google 2019 adjudication overrides NIH
    assert a.report is None


def test_read_nih_unknown_finding(tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", [{"image": "a.png", "labels": "Dragon", "patient_id": "1"}])
    with pytest.raises(ModelError, match=r"labels\.csv:2.*'Dragon'"):
        read_nih(tmp_path / "labels.csv")


def test_readers_name_missing_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", [{"image": "a.png", "labels": "Nodule"}])
    with pytest.raises(ModelError, match="missing column.*patient_id"):
        read_nih(tmp_path)
    write_csv(tmp_path / "d" / "train.csv", [{"Path": "x/patient1/study1/v.jpg", "Edema": "1.0"}])
    with pytest.raises(ModelError, match="missing column.*No Finding"):
        read_chexpert(tmp_path / "d" / "train.csv")


def test_read_covid(tmp_path: Path) -> None:
    rows = [
        {"id": "covid_0000", "image_file": "images/a.png", "report_text": "Fever and cough.", "finding": "COVID-19",
         "labels": "COVID-19", "patientid": "2"},
        {"id": "covid_0001", "image_file": "images/b.png", "report_text": "", "finding": "COVID-19, ARDS",
         "labels": "ARDS|COVID-19", "patientid": "2"},
        {"id": "covid_0002", "image_file": "images/c.png", "report_text": "x", "finding": "todo", "labels": "todo",
         "patientid": "3"},
        {"id": "covid_0003", "image_file": "images/d.png", "report_text": "", "finding": "No Finding",
         "labels": "No Finding", "patientid": "4"},
    ]  # fmt: skip
    write_csv(tmp_path / "records.csv", rows)
    a, b, c, d = read_covid(tmp_path)
    assert a.labels == vec("Pneumonia") and a.report == "Fever and cough." and a.patient_id == "covid:2"
    assert b.labels == vec("Pneumonia", "Lung Opacity") and b.report is None
    assert c.labels is None  # todo = unlabelled
    assert d.labels == vec("No Finding")


# ---------------------------------------------------------------- MIMIC-CXR-JPG and CheXpert layouts


def chexpert_columns(**values: str) -> dict[str, str]:
    return {name: values.get(name.replace(" ", "_"), "") for name in OBSERVATIONS}


@pytest.fixture
def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    write_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv",
        [
            {"subject_id": "10000032", "study_id": "50414267",
             **chexpert_columns(Pleural_Effusion="1.0", Edema="-1.0")},
            {"subject_id": "10000032", "study_id": "53189527",
             **chexpert_columns(No_Finding="1.0", Cardiomegaly="0.0")},
            {"subject_id": "11000011", "study_id": "51000001", **chexpert_columns(Pneumothorax="1.0")},
        ],
    )
    write_csv(
        root / "mimic-cxr-2.0.0-metadata.csv",
        [
            {"dicom_id": "aaa", "subject_id": "10000032", "study_id": "50414267", "ViewPosition": "PA"},
            {"dicom_id": "bbb", "subject_id": "10000032", "study_id": "50414267", "ViewPosition": "LATERAL"},
            {"dicom_id": "ccc", "subject_id": "10000032", "study_id": "53189527", "ViewPosition": "AP"},
            {"dicom_id": "ddd", "subject_id": "11000011", "study_id": "51000001", "ViewPosition": "PA"},
        ],
    )
    for rel in ("p10/p10000032/s50414267/aaa.jpg", "p10/p10000032/s50414267/bbb.jpg",
                "p10/p10000032/s53189527/ccc.jpg", "p11/p11000011/s51000001/ddd.jpg"):  # fmt: skip
        (root / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "files" / rel).write_bytes(b"")
    report = tmp_path / "reports" / "files" / "p10" / "p10000032" / "s50414267.txt"
    report.parent.mkdir(parents=True)
    report.write_text("EXAMINATION: CHEST\n\nFINDINGS: Small left effusion.\n\nIMPRESSION: Effusion.\n")
    return root


def test_read_mimic(mimic_root: Path) -> None:
    samples = read_mimic(mimic_root, reports=mimic_root.parent / "reports")
    assert [s.image.name for s in samples] == ["aaa.jpg", "ccc.jpg", "ddd.jpg"]  # lateral dropped
    aaa, ccc, ddd = samples
    assert aaa.labels == vec("Pleural Effusion")  # Edema -1 -> 0 under U-Zero
    assert aaa.report == "Small left effusion.\nEffusion."
    assert aaa.patient_id == ccc.patient_id == "mimic:10000032" and aaa.study_id == "s50414267"
    assert ccc.labels == vec("No Finding") and ccc.report is None
    assert ddd.labels == vec("Pneumothorax")


def test_read_mimic_policies_and_views(mimic_root: Path) -> None:
    ones = read_mimic(mimic_root, policy="u-ones", frontal_only=False)
    assert len(ones) == 4
    assert ones[0].labels == vec("Pleural Effusion", "Edema")
    with pytest.raises(ModelError, match="chexpert.csv"):
        read_mimic(mimic_root / "files")


def test_findings_and_impression() -> None:
    text = "INDICATION: cough\nFINDINGS: No effusion.\nIMPRESSION: Normal.\nRECOMMENDATION(S): none"
    assert findings_and_impression(text) == "No effusion.\nNormal."
    assert findings_and_impression("Just one paragraph.") == "Just one paragraph."


@pytest.fixture
def chexpert_csv(tmp_path: Path) -> Path:
    base = "CheXpert-v1.0-small/train"
    rows = [
        {"Path": f"{base}/patient00001/study1/view1_frontal.jpg", "Sex": "F", "Age": "68",
         "Frontal/Lateral": "Frontal", "AP/PA": "AP", **chexpert_columns(Cardiomegaly="1.0", Edema="-1.0")},
        {"Path": f"{base}/patient00001/study1/view2_lateral.jpg", "Sex": "F", "Age": "68",
         "Frontal/Lateral": "Lateral", "AP/PA": "", **chexpert_columns(Cardiomegaly="1.0")},
        {"Path": f"{base}/patient00002/study3/view1_frontal.jpg", "Sex": "M", "Age": "40",
         "Frontal/Lateral": "Frontal", "AP/PA": "PA", **chexpert_columns(No_Finding="1.0", Support_Devices="1.0")},
    ]  # fmt: skip
    return write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", rows)


def test_read_chexpert(chexpert_csv: Path) -> None:
    first, second = read_chexpert(chexpert_csv)
    assert first.image == chexpert_csv.parent.parent / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert first.patient_id == "chexpert:patient00001" and first.study_id == "patient00001/study1"
    assert first.labels == vec("Cardiomegaly")
    assert second.labels == vec("No Finding", "Support Devices")
    ones = read_chexpert(chexpert_csv, policy="u-ones", frontal_only=False)
    assert len(ones) == 3 and ones[0].labels == vec("Cardiomegaly", "Edema")
    assert read_chexpert(chexpert_csv, root="/data")[0].image == Path(
        "/data/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    )


def test_read_chexpert_bad_value(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d" / "train.csv", [{"Path": "x/patient1/study1/v.jpg", "Frontal/Lateral": "Frontal",
                                                    **chexpert_columns(Edema="2.0")}])  # fmt: skip
    with pytest.raises(ModelError, match=r"train\.csv:2.*'Edema'.*'2\.0'"):
        read_chexpert(path)


# ---------------------------------------------------------------- split


def many_samples() -> list[Sample]:
    return [Sample(f"p{i % 37}", f"s{i}", "x", report=f"r{i}") for i in range(200)]


def test_split_by_patient_is_disjoint_and_complete() -> None:
    samples = many_samples()
    parts = split_by_patient(samples, (0.7, 0.15, 0.15), seed=3)
    patient_sets = [{s.patient_id for s in part} for part in parts]
    assert sum(len(p) for p in parts) == len(samples)
    assert sum(len(p) for p in patient_sets) == len(set.union(*patient_sets)) == 37  # disjoint, all patients
    assert [len(p) for p in patient_sets] == [26, 5, 6]  # round(0.7*37)=26, round(0.85*37)=31


def test_split_by_patient_is_deterministic_and_order_free() -> None:
    samples = many_samples()
    first = split_by_patient(samples, (0.8, 0.2), seed=1)
    again = split_by_patient(list(reversed(samples)), (0.8, 0.2), seed=1)
    assert [{s.study_id for s in p} for p in first] == [{s.study_id for s in p} for p in again]
    other = split_by_patient(samples, (0.8, 0.2), seed=2)
    assert [{s.study_id for s in p} for p in first] != [{s.study_id for s in p} for p in other]


@pytest.mark.parametrize("fractions", [(), (0.5, 0.6), (1.2, -0.2)])
def test_split_by_patient_rejects_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ModelError, match="fractions"):
        split_by_patient(many_samples(), fractions)


# ---------------------------------------------------------------- the real sample data


def test_real_sources(shared_data: Path) -> None:
    nih = read_nih(shared_data / "nih-cxr14-1000")
    assert len(nih) == 795 and all(s.image.is_file() for s in nih[:20])
    covid = read_covid(shared_data / "covid-chestxray")
    assert len(covid) == 443 and sum(s.labels is None for s in covid) == 20
    iu = read_iu_reports(shared_data / "iu-reports" / "NLMCXR_reports.tgz")
    assert len(iu) == 3140  # of 3,164 XML files, 24 have neither FINDINGS nor IMPRESSION
    assert all(s.labels is not None and set(s.labels) <= {0, 1} for s in iu)


@settings(max_examples=40, deadline=None)
@given(
    patients=st.lists(st.integers(0, 30), min_size=1, max_size=80),
    cut=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_split_by_patient_never_splits_a_patient(patients: list[int], cut: float, seed: int) -> None:
    samples = [Sample(f"p{p}", f"s{i}", "x", report="r") for i, p in enumerate(patients)]
    parts = split_by_patient(samples, (cut, 1.0 - cut), seed=seed)
    assert sorted(s.study_id for part in parts for s in part) == sorted(s.study_id for s in samples)
    first, second = ({s.patient_id for s in part} for part in parts)
    assert not first & second
