"""`mmdl-node bench populate`: fill a data dir's catalog and index with synthetic studies for benchmarks.

The studies are clearly synthetic: ``Study.synthetic`` is true, their UIDs sit under SYNTHETIC_ROOT and
their model version is "synthetic". A catalog that holds any real study is refused, so benchmark data
never mixes with patients' studies. Vectors are clustered (unit cluster centres plus Gaussian noise),
like real embeddings of similar studies, so that the index's recall is measured on a realistic shape; the
centres are random, or real embeddings of the public sample radiographs (--centres).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sqlalchemy import func, insert, select

from config import load_settings
from config.settings import Settings
from dicom_node.server import model_directory
from indexer.catalog import Catalog, to_blob
from indexer.errors import IndexerError
from indexer.schema import Study
from indexer.vector_index import HnswParams, VectorIndex
from models.bundle_manifest import embedding_dim
from models.observations import OBSERVATIONS

# 2.25.<UUID as an integer>: a root of our own for synthetic UIDs (UUID generated once for this purpose).
SYNTHETIC_ROOT = "2.25.166302345186226097417846432612938617621"
SYNTHETIC_VERSION = "synthetic"
CHUNK = 20_000


class RealStudiesError(IndexerError):
    def __init__(self, count: int) -> None:
        super().__init__(f"the catalog holds {count} real studies; synthetic studies go into a data dir of their own")


def random_centres(rng: np.random.Generator, clusters: int, dim: int) -> np.ndarray:
    """``clusters`` random unit vectors (float32)."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres


def vectors_around(rng: np.random.Generator, centres: np.ndarray, count: int, noise: float) -> np.ndarray:
    """``count`` unit vectors, each a random centre plus Gaussian noise of expected norm ``noise`` (float32)."""
    vectors = centres[rng.integers(0, len(centres), count)].astype(np.float32)
    vectors += rng.standard_normal(vectors.shape).astype(np.float32) * (noise / np.sqrt(centres.shape[1]))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def neighbour_distance(centres: np.ndarray) -> float:
    """The median distance from a centre to its nearest other centre (unit vectors)."""
    similarity = centres @ centres.T
    np.fill_diagonal(similarity, -1.0)
    return float(np.median(np.sqrt(np.maximum(0.0, 2.0 - 2.0 * similarity.max(axis=1)))))


def synthetic_uid(number: int) -> str:
    return f"{SYNTHETIC_ROOT}.{number}"


def populate(settings: Settings, count: int, clusters: int = 1000, seed: int = 0,
             centres: np.ndarray | None = None) -> dict[str, float]:
    """Add ``count`` synthetic studies to the catalog and index of ``settings``; returns timings (s).

    Their vectors are drawn around ``clusters`` random unit centres with noise of norm 0.35, or, given
    ``centres`` (real embeddings: bench.sample_embeddings), around those, with noise of norm their median
    nearest-neighbour distance, so that copies of one embedding mix with its real neighbours."""
    if count < 1:
        raise IndexerError(f"count must be at least 1, got {count}")
    started = time.monotonic()
    data_dir = settings.node.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    params = HnswParams.from_settings(embedding_dim(model_directory(settings)), settings.index)
    catalog = Catalog(settings.catalog_url)
    try:
        with catalog.session() as session:
            real = session.scalar(select(func.count()).select_from(Study).where(Study.synthetic.is_(False)))
            first = (session.scalar(select(func.max(Study.id))) or 0) + 1
        if real:
            raise RealStudiesError(real)
        seq = catalog.max_index_seq() + 1
        rng = np.random.default_rng(seed + first)
        if centres is None:
            centres, noise = random_centres(rng, clusters, params.dim), 0.35
        else:
            centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
            noise = neighbour_distance(centres)
        if centres.shape[1] != params.dim:
            raise IndexerError(f"the centres have dimension {centres.shape[1]}, the model {params.dim}")
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            vectors = vectors_around(rng, centres, n, noise)
            scores = rng.random((n, len(OBSERVATIONS)), dtype=np.float32)
            rows = []
            for i in range(n):
                pk = first + start + i
                rows.append({
                    "id": pk, "study_uid": synthetic_uid(pk), "patient_id": f"SYN{pk % (count // 3 + 1):08d}",
                    "patient_name": "SYNTHETIC^STUDY", "accession_number": f"SYN{pk:013d}"[-16:],
                    "study_date": "20200101", "study_description": "synthetic benchmark study",
                    "vector": to_blob(vectors[i]), "label_scores": to_blob(scores[i]), "index_seq": seq,
                    "model_version": SYNTHETIC_VERSION, "dirty": False, "synthetic": True,
                })
            with catalog.engine.begin() as connection:
                connection.execute(insert(Study), rows)
        inserted = time.monotonic()
        index = VectorIndex.open(params, data_dir / "index", catalog)
        indexed = time.monotonic()
        index.snapshot()
        return {"catalog_s": inserted - started, "index_s": indexed - inserted,
                "snapshot_s": time.monotonic() - indexed, "studies": float(len(index))}
    finally:
        catalog.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench_command", required=True)
    fill = commands.add_parser("populate", help="fill the configured data dir with N synthetic studies")
    fill.add_argument("--config", help="TOML configuration file (default: embedded defaults)")
    fill.add_argument("--count", type=int, required=True, help="how many synthetic studies to add")
    fill.add_argument("--clusters", type=int, default=1000, help="clusters the vectors are drawn around")
    fill.add_argument("--centres", type=Path,
                      help=".npy of real embeddings (python -m bench.sample_embeddings) to draw the studies around")
    fill.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    try:
        centres = None if args.centres is None else np.load(args.centres)
        figures = populate(settings, args.count, args.clusters, args.seed, centres)
    except IndexerError as error:
        print(error)
        return 1
    print(f"{int(figures['studies'])} studies indexed in {settings.node.data_dir}: catalog "
          f"{figures['catalog_s']:.1f} s, index {figures['index_s']:.1f} s, snapshot {figures['snapshot_s']:.1f} s")
    return 0
