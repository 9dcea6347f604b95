"""`mmdl-node label` and `mmdl-node manifest` through run(args), and label through the `mmdl-node` entry point as a subprocess."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.commands import label, manifest
from models.datasets import read_manifest
from models.observations import OBSERVATIONS

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    path = tmp_path / "reports.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "No pneumothorax. Small left pleural effusion."}),
        "",
        "{not json",
        json.dumps({"id": 7, "text": "Possible right lower lobe pneumonia."}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "no-text"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_label_raw_output_and_bad_lines(reports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = label.run(parse(label, [str(reports)]))
    out, err = capsys.readouterr()
    results = [json.loads(line) for line in out.splitlines()]
    assert rc == 1  # some lines were bad, the good ones were still labelled
    assert [r["id"] for r in results] == ["a", 7]
    first = results[0]["labels"]
    assert list(first) == list(OBSERVATIONS)
    assert first["Pneumothorax"] == 0 and first["Pleural Effusion"] == 1 and first["Cardiomegaly"] is None
    assert results[1]["labels"]["Pneumonia"] == -1
    assert "line 3: not valid JSON" in err
    assert "line 5: expected a JSON object" in err
    assert "line 6: field 'text' must be a string" in err
    assert "Small left" not in err  # never echo report text


def test_label_policy(reports: Path, capsys: pytest.CaptureFixture[str]) -> None:
    label.run(parse(label, [str(reports), "--policy", "u-ones"]))
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert results[1]["labels"]["Pneumonia"] == 1
    assert all(v in (0, 1) for r in results for v in r["labels"].values())
    label.run(parse(label, [str(reports), "--policy", "u-ignore"]))
    ignored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ignored[1]["labels"]["Pneumonia"] == -1 and ignored[1]["labels"]["Cardiomegaly"] == 0


def test_label_all_good_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": 1, "text": "Normal chest."}) + "\n")
    assert label.run(parse(label, [str(good)])) == 0
    assert label.run(parse(label, [str(tmp_path / "missing.jsonl")])) == 2
    assert "cannot read" in capsys.readouterr().err


def test_label_command_from_stdin() -> None:
    line = json.dumps({"id": "x", "text": "Moderate cardiomegaly. No edema."}) + "\n"
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "label", "-"],
        input=line, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["labels"]["Cardiomegaly"] == 1 and result["labels"]["Edema"] == 0


def test_manifest_from_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nih = tmp_path / "nih"
    nih.mkdir()
    with open(nih / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels", "patient_id"])
        writer.writerow(["images/a.png", "Effusion|Nodule", "1"])
    covid = tmp_path / "covid"
    covid.mkdir()
    with open(covid / "records.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image_file", "report_text", "finding", "labels", "patientid"])
        writer.writerow(["covid_1", "images/b.png", "Cough, fever.", "todo", "todo", "5"])
    out = tmp_path / "out" / "manifest.csv"
    rc = manifest.run(parse(manifest, ["--nih", str(nih), "--covid", str(covid), "--out", str(out)]))
    assert rc == 0
    assert "wrote 2 samples (nih 1, covid 1)" in capsys.readouterr().out
    first, second = read_manifest(out)
    assert first.image == nih / "images" / "a.png" and first.patient_id == "nih:1"
    assert first.labels is not None and first.labels[OBSERVATIONS.index("Lung Lesion")] == 1
    assert second.labels is None and second.report == "Cough, fever."


def test_manifest_needs_a_source_and_reports_bad_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manifest.run(parse(manifest, ["--out", str(tmp_path / "m.csv")])) == 2
    assert manifest.run(parse(manifest, ["--iu", str(tmp_path / "none.tgz"), "--out", str(tmp_path / "m.csv")])) == 2
    assert "not found" in capsys.readouterr().err
