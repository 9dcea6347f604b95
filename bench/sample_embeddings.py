"""Real image embeddings of the public sample radiographs, for benchmarks that need realistic vectors.

Embeds every PNG under the given folders with a model bundle (the shipped one by default) as the embedding
job does (models.imaging.load_image, MMDLModel.embed_images) and writes them, unit-normalised, to one .npy
file. `bench populate --centres FILE` then draws synthetic studies around them with noise, so that index
recall is measured on the geometry of the model's own embeddings, not only on random clusters. Run from the
repository root:

    .venv/bin/python -m bench.sample_embeddings --out /tmp/mmdl-bench/sample-embeddings.npy \\
        ../shared/data/nih-cxr14-1000/images ../shared/data/covid-chestxray/images
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def sample_embeddings(folders: list[Path], model_dir: Path, batch: int = 16) -> np.ndarray:
    """(n, dim) unit float32 embeddings of every PNG under ``folders``, in sorted path order."""
    from models.bundle import MMDLModel
    from models.imaging import load_image

    model = MMDLModel.load(model_dir, device="cpu")
    paths = sorted(p for folder in folders for p in folder.rglob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG images under {', '.join(map(str, folders))}")
    chunks = [model.embed_images([load_image(p) for p in paths[i:i + batch]]) for i in range(0, len(paths), batch)]
    vectors = np.concatenate(chunks).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def main() -> int:
    from models.bundle_manifest import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders of PNG chest radiographs")
    parser.add_argument("--out", type=Path, required=True, help=".npy file to write")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model bundle (default: shipped)")
    args = parser.parse_args()
    start = time.monotonic()
    vectors = sample_embeddings(args.folders, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, vectors)
    print(f"{len(vectors)} embeddings of dimension {vectors.shape[1]} in {time.monotonic() - start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
