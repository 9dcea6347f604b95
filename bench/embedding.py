"""Embedding: end-to-end images/s of the embedding job (read, decode, preprocess, SCDA, encode, index)
against the raw backbone forward pass on ready tensors at the same batch size, in the same run.

Writes --count DX files (from the public NIH PNGs) into a temporary node storage once; each round
catalogs them as pending in a fresh catalog and index and times `EmbeddingJob.run` until all are
indexed, then times the backbone's forward pass on ready (batch, 3, size, size) tensors for the same
number of images. Rounds alternate the two, so that a load change on a shared machine hits both;
the figure is the median of the rounds. Both are warmed up first. The model is the shipped one
(models/mmdl_default) unless --model names another; --random-224 measures a random model of the
same architecture at 224 px with SCDA on (two backbone passes per image). Runs on the CPU, and on
the GPU too when one is available. Also times, on one thread, decoding and preprocessing one batch
(the work the pool overlaps with the model), and the share of each job run its own thread spends in
the model (the rest is waiting on the pool or the catalog writer, and the queries for pending items).
Prints one JSON line per figure and a Markdown table.
Run from the repository root:

    .venv/bin/python -m bench.embedding --images ../shared/data/nih-cxr14-1000/images
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydicom.uid import generate_uid

from bench.query import load, machine
from dicom_node.server import decode_stored_image
from indexer.catalog import Catalog, InstanceAttrs, SeriesAttrs, StudyAttrs
from indexer.embedding import EmbeddingJob
from indexer.schema import Kind
from indexer.vector_index import HnswParams, VectorIndex
from models.bundle import MMDLModel, create_random_model
from models.bundle_manifest import DEFAULT_MODEL_DIR
from models.imaging import to_model_input
from tests.dicom_node.builders import dx_from_png


def write_files(storage: Path, pngs: list[Path], count: int) -> list[InstanceAttrs]:
    """``count`` DX files under ``storage`` (one study each), and their catalog attributes."""
    storage.mkdir(parents=True)
    written = []
    for i in range(count):
        ds = dx_from_png(pngs[i % len(pngs)], generate_uid(), f"E{i}", f"E{i}")
        path = storage / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(InstanceAttrs(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID,
                                     path.name, path.stat().st_size, Kind.IMAGE))
    return written


def pending_catalog(folder: Path, files: list[InstanceAttrs]) -> Catalog:
    """A fresh catalog in ``folder`` holding ``files`` as pending images, one study each."""
    folder.mkdir(parents=True)
    catalog = Catalog(f"sqlite:///{folder / 'catalog.sqlite3'}")
    for attrs in files:
        catalog.add_instance(StudyAttrs(generate_uid()), SeriesAttrs(generate_uid()), attrs)
    return catalog


class TimedEncoder:
    """The model, counting the seconds its image calls take on the job's thread (the rest is overhead)."""

    def __init__(self, model: MMDLModel) -> None:
        self.model, self.version, self.seconds = model, model.version, 0.0

    def prepare_image(self, image: np.ndarray) -> Any:
        return self.model.prepare_image(image)

    def embed_prepared(self, prepared: Sequence[Any]) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self.model.embed_prepared(prepared)
        finally:
            self.seconds += time.perf_counter() - start

    def embed_reports(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.embed_reports(texts)

    def predict_labels(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.predict_labels(embeddings)


def end_to_end(folder: Path, storage: Path, files: list[InstanceAttrs], model: MMDLModel, batch: int,
               workers: int) -> tuple[float, float]:
    """Images/s of one embedding job run over ``files``, all pending, model already loaded, and the
    share of the run that the job's thread spent in the model's image calls."""
    catalog = pending_catalog(folder, files)
    index = VectorIndex(HnswParams(model.embedding_dim), folder / "index")
    timed = TimedEncoder(model)
    job = EmbeddingJob(catalog, index, storage, load_model=lambda: timed, decode=decode_stored_image,
                       batch_size=batch, decode_workers=workers, max_seconds=3600)
    try:
        start = time.perf_counter()
        stats = job.run()
        seconds = time.perf_counter() - start
    finally:
        job.close()
        catalog.close()
    if stats.images != len(files):
        raise SystemExit(f"the job embedded {stats.images} of {len(files)} images ({stats.failures})")
    return len(files) / seconds, timed.seconds / seconds


@torch.no_grad()
def raw_forward(model: MMDLModel, tensors: torch.Tensor, count: int) -> float:
    """Images/s of one backbone forward pass per image on ready, normalised tensors (nothing else timed)."""
    done = 0
    start = time.perf_counter()
    while done < count:
        model.backbone(tensors)
        done += len(tensors)
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def host_work_ms(storage: Path, files: list[InstanceAttrs], model: MMDLModel) -> dict[str, float]:
    """Milliseconds per image, on this thread, to read + decode and to preprocess (what the pool does)."""
    start = time.perf_counter()
    images = [decode_stored_image(storage / f.path) for f in files]
    decoded = time.perf_counter()
    for image in images:
        model.prepare_image(image)
    prepared = time.perf_counter()
    return {"decode_ms": round(1000 * (decoded - start) / len(files), 2),
            "prepare_ms": round(1000 * (prepared - decoded) / len(files), 2)}


def measure(model: MMDLModel, work: Path, storage: Path, files: list[InstanceAttrs], images: list[np.ndarray],
            args: argparse.Namespace) -> dict[str, object]:
    """Alternated rounds of the job and of the raw forward pass on one device; one figure."""
    tensors = to_model_input(images[: args.batch], model.preprocessing).to(model.device)
    with torch.no_grad():
        model.backbone(tensors)  # warm-up: both paths then run on a model that has seen this batch shape
    model.embed_images(images[: args.batch])
    load_before, started = load(), datetime.now(timezone.utc)
    e2e, raw, share = [], [], []
    for r in range(args.rounds):
        rate, in_model = end_to_end(work / f"e2e-{model.device}-{r}", storage, files, model, args.batch, args.workers)
        e2e.append(rate)
        share.append(in_model)
        raw.append(raw_forward(model, tensors, len(files)))
    e2e_median, raw_median = statistics.median(e2e), statistics.median(raw)
    return {"bench": "embedding", "machine": machine(), "device": model.device, "model": args.label,
            "scda": model.scda, "input_px": model.preprocessing.size, "batch": args.batch, "images": len(files),
            "rounds": args.rounds, "decode_workers": args.workers, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
            "end_to_end_per_s": round(e2e_median, 2), "raw_forward_per_s": round(raw_median, 2),
            "ratio": round(e2e_median / raw_median, 3),
            "round_ratios": [round(e / r, 3) for e, r in zip(e2e, raw)],
            "job_thread_in_model": round(statistics.median(share), 3),
            **host_work_ms(storage, files[: args.batch], model),
            "start_utc": f"{started:%H:%M:%S}", "end_utc": f"{datetime.now(timezone.utc):%H:%M:%S}",
            "load": f"{load_before} -> {load()}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of PNG chest X-rays")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model directory (default: the shipped one)")
    which.add_argument("--random-224", action="store_true",
                       help="a random model of the shipped architecture at 224 px with SCDA on, instead")
    parser.add_argument("--count", type=int, default=64, help="images per end-to-end round")
    parser.add_argument("--batch", type=int, default=16, help="the job's batch size (scheduler.batch_size)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of job and raw forward")
    parser.add_argument("--workers", type=int, default=2, help="the job's decode pool (scheduler.decode_workers)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when one is available")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pngs = sorted(args.images.glob("*.png"))
    if not pngs:
        raise SystemExit(f"no PNG files in {args.images}")
    work = Path(tempfile.mkdtemp(prefix="mmdl-embedding-"))
    model_dir = args.model
    if args.random_224:
        model_dir = work / "model"
        create_random_model(model_dir, seed=0, device="cpu", image_size=224)
    args.label = "random-224" if args.random_224 else model_dir.name
    storage = work / "storage"
    files = write_files(storage, pngs, args.count)
    images = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255 for p in pngs[: args.batch]]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    figures = [measure(MMDLModel.load(model_dir, device=d), work, storage, files, images, args) for d in devices]
    for figure in figures:
        print(json.dumps(figure))
    print(f"\n{machine()}; model {args.label}; batch {args.batch}, {args.count} images, median of {args.rounds} rounds\n")
    print("| device | model | SCDA | end-to-end images/s | raw forward images/s | ratio (rounds) | job thread in model "
          "| decode + prepare ms/img (1 thread) | UTC | load |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in figures:
        print(f"| {f['device']} ({f['torch_threads']} threads) | {f['input_px']} px | {'on' if f['scda'] else 'off'} "
              f"| {f['end_to_end_per_s']} | {f['raw_forward_per_s']} "
              f"| {f['ratio']} ({', '.join(map(str, f['round_ratios']))}) | {f['job_thread_in_model']} "
              f"| {f['decode_ms']} + {f['prepare_ms']} "
              f"| {f['start_utc']}-{f['end_utc']} | {f['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
