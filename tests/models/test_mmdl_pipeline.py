"""Training and evaluation end to end on a tiny synthetic manifest (PNG images + reports)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.bundle import MMDLModel
from models.commands import evaluate as evaluate_command
from models.commands import train as train_command
from models.datasets import read_manifest, write_manifest
from models.evaluate import MAIN_METHODS, coverage_name
from models.observations import OBSERVATIONS, Sample
from models.train import HeadConfig, cycled_order, keep_reports, train_heads

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
    """24 images of 8 patients (a bright square whose place says the class), some with a report,
    and 16 report-only samples."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    samples = []
    for i in range(24):
        k = i % 4
        pixels = rng.random((64, 64)) * 0.3
        pixels[10 * k : 10 * k + 24, 10 * k : 10 * k + 24] += 0.6
        path = root / "img" / f"{i}.png"
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)
        report = TEXT[CLASSES[k]] if i % 3 == 0 else None
        samples.append(Sample(f"p{i % 8}", f"s{i}", "synthetic", image=path, report=report, labels=_labels(CLASSES[k])))
    for i in range(16):
        name = CLASSES[i % 4]
        samples.append(Sample(f"r{i}", f"r{i}", "synthetic", report=TEXT[name] + " Stable.", labels=_labels(name)))
    manifest = root / "manifest.csv"
    write_manifest(samples, manifest)
    return manifest


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
        assert 0.0 <= values["map@10"] <= 1.0
        assert set(values["ap@10_per_class"]) == set(OBSERVATIONS)
    assert "acc@1" in metrics["MMDL"] and "acc@1" not in metrics["Image-D121"]
    table = (out / "metrics.md").read_text()
    assert "| Image-D121 |" in table and "| MMDL (50% reports) |" in table
    for name in ("map_at_k.png", "ap10_per_class.png", "coverage.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
