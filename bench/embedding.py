"""Embedding: end-to-end images/s of the embedding job (read, decode, preprocess, SCDA, encode, index)
against the raw backbone forward pass on ready tensors at the same batch size, in the same run.

Writes --count DX files (from the public NIH PNGs) into a temporary node storage, catalogs them as
pending, and times `EmbeddingJob.run` until all are indexed; then times the model's backbone on
ready (batch, 3, size, size) tensors for the same number of images. Without --model a random model
of the shipped architecture (224-pixel input) is used: the same layers, so the same cost. Runs on the
CPU, and on the GPU too when one is available. Prints one JSON line per figure and a Markdown table.
Run from the repository root:

    .venv/bin/python -m bench.embedding --images ../shared/data/nih-cxr14-1000/images
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

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
from models.imaging import to_model_input
from models.observations import EMBEDDING_DIM
from tests.dicom_node.builders import dx_from_png


def write_pending(folder: Path, pngs: list[Path], count: int) -> Catalog:
    """A catalog with ``count`` pending DX images stored under ``folder / 'storage'``."""
    storage = folder / "storage"
    storage.mkdir(parents=True)
    catalog = Catalog(f"sqlite:///{folder / 'catalog.sqlite3'}")
    for i in range(count):
        ds = dx_from_png(pngs[i % len(pngs)], generate_uid(), f"E{i}", f"E{i}")
        path = storage / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        catalog.add_instance(StudyAttrs(ds.StudyInstanceUID), SeriesAttrs(ds.SeriesInstanceUID),
                             InstanceAttrs(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID,
                                           path.name, path.stat().st_size, Kind.IMAGE))
    return catalog


def end_to_end(folder: Path, pngs: list[Path], count: int, model: MMDLModel, batch: int) -> float:
    """Images/s of the embedding job over ``count`` pending images, model already loaded."""
    catalog = write_pending(folder, pngs, count)
    index = VectorIndex(HnswParams(EMBEDDING_DIM), folder / "index")
    job = EmbeddingJob(catalog, index, folder / "storage", load_model=lambda: model, decode=decode_stored_image,
                       batch_size=batch, decode_workers=2, max_seconds=3600)
    start = time.perf_counter()
    stats = job.run()
    seconds = time.perf_counter() - start
    job.close()
    catalog.close()
    if stats.images != count:
        raise SystemExit(f"the job embedded {stats.images} of {count} images ({stats.failures})")
    return count / seconds


@torch.no_grad()
def raw_forward(model: MMDLModel, images: list[np.ndarray], count: int, batch: int) -> float:
    """Images/s of one backbone forward pass on ready, normalised tensors (preprocessing not timed)."""
    tensors = to_model_input(images[:batch], model.preprocessing).to(model.device)
    model.backbone(tensors)  # warm-up
    done = 0
    start = time.perf_counter()
    while done < count:
        model.backbone(tensors)
        done += batch
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of PNG chest X-rays")
    parser.add_argument("--model", type=Path, help="model directory (default: a random model, 224 px)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="the job's batch size (scheduler.batch_size)")
    args = parser.parse_args()

    pngs = sorted(args.images.glob("*.png"))
    work = Path(tempfile.mkdtemp(prefix="mmdl-embedding-"))
    if args.model is None:
        create_random_model(work / "model", seed=0, device="cpu")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    figures = []
    for device in devices:
        model = MMDLModel.load(args.model or work / "model", device=device)
        images = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255 for p in pngs[: args.batch]]
        load_before = load()
        e2e = end_to_end(work / f"e2e-{device}", pngs, args.count, model, args.batch)
        raw = raw_forward(model, images, args.count, args.batch)
        figures.append({"bench": "embedding", "machine": machine(), "device": device, "batch": args.batch,
                        "images": args.count, "torch_threads": torch.get_num_threads(), "scda": model.scda,
                        "end_to_end_per_s": round(e2e, 2), "raw_forward_per_s": round(raw, 2),
                        "ratio": round(e2e / raw, 3), "load": f"{load_before} -> {load()}"})
    for figure in figures:
        print(json.dumps(figure))
    print(f"\n{machine()}; batch {args.batch}, {args.count} images\n")
    print("| device | end-to-end images/s | raw forward images/s | ratio | load |\n| --- | --- | --- | --- | --- |")
    for f in figures:
        print(f"| {f['device']} | {f['end_to_end_per_s']} | {f['raw_forward_per_s']} | {f['ratio']} | {f['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
