"""Training and evaluation end to end on a tiny synthetic manifest (PNG images + reports)."""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bundle import MMDLModel
from models.commands import calibrate as calibrate_command
from models.commands import evaluate as evaluate_command
from models.commands import train as train_command
from models.datasets import read_manifest, write_manifest
from models.evaluate import MAIN_METHODS, STUDY_METHODS, coverage_name
from models.observations import OBSERVATIONS, Sample
from models.study_sets import held_out_digest
from models.train import HeadConfig, cycled_order, keep_reports, train_heads, training_split

CLASSES = ("No Finding", "Cardiomegaly", "Pleural Effusion", "Pneumonia")
TEXT = {
    "No Finding": "Lungs are clear. No acute cardiopulmonary abnormality.",
    "Cardiomegaly": "The heart is enlarged. No effusion.",
    "Pleural Effusion": "Small left pleural effusion with basilar opacity.",
    "Pneumonia": "Right lower lobe consolidation consistent with pneumonia.",
}


def _labels(name: str) -> tuple[int, ...]:
    return tuple(int(o == name) for o in OBSERVATIONS)


def build_manifest(root: Path) -> Path:
    """32 images of 8 patients, each patient with one image of every class (a bright square whose place
    says the class), some with a report, and 16 report-only samples of the same patients."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    samples = []
    for i in range(32):
        k = (i + i // 8) % 4
        pixels = rng.random((64, 64)) * 0.3
        pixels[10 * k : 10 * k + 24, 10 * k : 10 * k + 24] += 0.6
        path = root / "img" / f"{i}.png"
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
        report = TEXT[CLASSES[k]] if i % 3 == 0 else None
        samples.append(Sample(f"p{i % 8}", f"s{i}", "synthetic", image=path, report=report, labels=_labels(CLASSES[k])))
    for i in range(16):
        name = CLASSES[i % 4]
        samples.append(Sample(f"p{i % 8}", f"r{i}", "synthetic", report=TEXT[name] + " Stable.", labels=_labels(name)))
    manifest = root / "manifest.csv"
    write_manifest(samples, manifest)
    return manifest


MARGIN = 0.1  # mAP@10 above the random floor that separable data must give
TRAIN_ARGS = [
    "--test-fraction", "0.25", "--image-size", "64", "--backbone-epochs", "1", "--backbone-batch-size", "8",
    "--head-epochs", "3", "--doc2vec-dim", "16", "--doc2vec-epochs", "5", "--no-progress", "--device", "cpu",
]


def _parse(module: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    manifest = build_manifest(root / "data")
    args = _parse(train_command, ["--manifest", str(manifest), "--out", str(root / "model"),
                                  "--work-dir", str(root / "work"), *TRAIN_ARGS])
    assert train_command.run(args) == 0
    return manifest, root / "model", root / "work"


def test_train_command_writes_a_loadable_model(trained: tuple[Path, Path, Path]) -> None:
    _, model_dir, work = trained
    model = MMDLModel.load(model_dir, device="cpu")
    assert model.training["test_fraction"] == 0.25
    _, test = training_split(read_manifest(trained[0]), 0.25, 0)
    assert model.training["test_patients_sha256"] == held_out_digest(test)
    assert model.training["config"]["image_size"] == 64
    assert model.report_encoder.dim == 16
    assert len(model.training["head_losses"]) == 3
    assert list(work.glob("backbone-*.ckpt")) and list(work.glob("heads-*.ckpt"))
    assert list((work / "cache").glob("features-*.npz"))
    h = model.embed_reports([TEXT["Cardiomegaly"]])
    assert h.shape == (1, 512)


def test_rerun_resumes_from_the_work_dir(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    manifest, model_dir, work = trained
    first = MMDLModel.load(model_dir, device="cpu")
    args = _parse(train_command, ["--manifest", str(manifest), "--out", str(tmp_path / "again"),
                                  "--work-dir", str(work), *TRAIN_ARGS])
    assert train_command.run(args) == 0
    again = MMDLModel.load(tmp_path / "again", device="cpu")
    assert again.version == first.version  # same checkpoints, same weights
    assert again.training["head_losses"] == first.training["head_losses"]


def test_evaluate_command_writes_metrics_table_and_plots(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    manifest, model_dir, work = trained
    out = tmp_path / "eval"
    args = _parse(evaluate_command, ["--manifest", str(manifest), "--model", str(model_dir), "--out", str(out),
                                     "--coverage", "50", "100", "--cache-dir", str(work / "cache"),
                                     "--device", "cpu", "--no-progress"])
    assert evaluate_command.run(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {*MAIN_METHODS, coverage_name(0.5), coverage_name(1.0)}
    for values in metrics.values():
        assert set(values["ap@10_per_class"]) == set(OBSERVATIONS)
    print({name: round(values["map@10"], 3) for name, values in metrics.items()})
    # the classes are separable (a bright square's place): the model must beat random ranking clearly
    assert metrics["MMDL"]["map@10"] > metrics["Random"]["map@10"] + MARGIN
    assert "acc@1" in metrics["MMDL"] and "acc@1" not in metrics["Image-D121"]
    table = (out / "metrics.md").read_text()
    assert "| Image-D121 |" in table and "| MMDL (50% reports) |" in table
    for name in ("map_at_k.png", "ap10_per_class.png", "coverage.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_then_evaluate_studies_and_refuse_another_split(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    manifest, model_dir, work = trained
    model_copy = tmp_path / "model"
    shutil.copytree(model_dir, model_copy)
    args = _parse(calibrate_command, ["--manifest", str(manifest), "--model", str(model_copy), "--cache-dir",
                                      str(work / "cache"), "--validation-fraction", "0.5", "--device", "cpu",
                                      "--no-progress"])
    assert calibrate_command.run(args) == 0
    model = MMDLModel.load(model_copy, device="cpu")
    assert model.calibration is not None and model.calibration.model_version == model.version
    _, test = training_split(read_manifest(manifest), 0.25, 0)
    assert model.training["test_patients_sha256"] == held_out_digest(test)

    out = tmp_path / "studies"
    args = _parse(evaluate_command, ["--studies", "--seeds", "0", "1", "--manifest", str(manifest), "--model",
                                     str(model_copy), "--out", str(out), "--cache-dir", str(work / "cache"),
                                     "--device", "cpu", "--no-progress"])
    assert evaluate_command.run(args) == 0
    written = json.loads((out / "metrics-studies.json").read_text())
    assert set(written["results"]) == set(STUDY_METHODS)
    assert written["results"]["MMDL"]["runs"] == 2 and written["results"]["Image-D121"]["runs"] == 1
    assert "| MMDL | 2 |" in (out / "metrics-studies.md").read_text()

    # another split of the same manifest, and the same split of a manifest with one patient renamed
    args = _parse(evaluate_command, ["--manifest", str(manifest), "--model", str(model_copy), "--out", str(out),
                                     "--test-fraction", "0.5", "--coverage", "--no-progress", "--device", "cpu"])
    assert evaluate_command.run(args) == 2
    samples = read_manifest(manifest)
    renamed = [replace(s, patient_id="p-new") if s.patient_id == test[0].patient_id else s for s in samples]
    write_manifest(renamed, tmp_path / "renamed.csv")
    args = _parse(evaluate_command, ["--studies", "--seeds", "0", "--manifest", str(tmp_path / "renamed.csv"),
                                     "--model", str(model_copy), "--out", str(out), "--no-progress", "--device", "cpu"])
    assert evaluate_command.run(args) == 2


def test_evaluate_without_a_split_is_refused(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    manifest, model_dir, _ = trained
    args = _parse(evaluate_command, ["--manifest", str(manifest), "--model", str(model_dir), "--out",
                                     str(tmp_path), "--test-fraction", "0", "--no-progress"])
    assert evaluate_command.run(args) == 2


def test_keep_reports_is_seeded_and_keeps_images(trained: tuple[Path, Path, Path]) -> None:
    samples = read_manifest(trained[0])
    half = keep_reports(samples, 0.5, seed=1)
    assert half == keep_reports(list(reversed(samples)), 0.5, seed=1)[::-1]
    assert keep_reports(samples, 1.0) == samples
    assert sum(s.image is not None for s in half) == sum(s.image is not None for s in samples)
    with_report = sum(bool(s.report) for s in samples)
    assert 0.2 * with_report < sum(bool(s.report) for s in half) < 0.8 * with_report


def test_train_heads_lowers_the_loss_and_resumes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((40, 14)) > 0.7).astype(np.float32)
    x_img = y @ rng.standard_normal((14, 32)) + 0.1 * rng.standard_normal((40, 32))
    x_rep = y @ rng.standard_normal((14, 8))
    config = HeadConfig(epochs=4, batch_size=8, dropout=0.0)
    _, losses = train_heads(x_img, y, x_rep, y, config, checkpoint=tmp_path / "h.ckpt", progress=False)
    assert losses[-1] < losses[0]
    _, resumed = train_heads(x_img, y, x_rep, y, HeadConfig(epochs=6, batch_size=8, dropout=0.0),
                             checkpoint=tmp_path / "h.ckpt", progress=False)
    assert resumed[:4] == losses and len(resumed) == 6


def test_report_pool_is_worked_through_across_epochs() -> None:
    drawn = np.concatenate([cycled_order(10, epoch, 4, seed=0) for epoch in range(5)])
    assert sorted(drawn) == sorted(list(range(10)) * 2)  # 5 epochs x 4 = two full passes
    assert not np.array_equal(drawn[:10], np.arange(10))
