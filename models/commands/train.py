"""`mmdl-node train`: train an MMDL model from a CSV manifest and save it as a model directory.

Example (what scripts/train_default_model.sh runs)::

    mmdl-node train --manifest runs/manifest.csv --out models/mmdl_default --work-dir runs/train \
        --test-fraction 0.2

Rerunning the same command resumes: Doc2Vec, the backbone checkpoint (per epoch), the cached
image features and the head checkpoint are kept in ``--work-dir`` under names derived from their
inputs. ``--test-fraction`` holds out that share of the PATIENTS (``split_by_patient`` with
``--split-seed``) for ``mmdl-node evaluate``, which makes the same split from the same manifest.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from models.backbone_training import BackboneTrainingConfig
from models.datasets import read_manifest
from models.errors import ModelError
from models.study_sets import held_out_digest
from models.train import HeadConfig, TrainConfig, train_model, training_split

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmdl-node train`."""
    parser.add_argument("--manifest", required=True, help="CSV manifest (image, report, labels, patient_id, ...)")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--work-dir", default="runs/train", help="checkpoints and caches (resume from here)")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="share of patients held out (0-0.9)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the patient split")
    parser.add_argument("--report-fraction", type=float, default=100.0, help="percent of reports kept (0-100)")
    parser.add_argument("--image-size", type=int, default=224, help="backbone input size in pixels")
    parser.add_argument("--no-scda", action="store_true", help="features of the whole image, no SCDA crop")
    parser.add_argument("--init-backbone", type=Path,
                        help="DenseNet121 checkpoint to start from (torchvision or torchxrayvision state dict)")
    parser.add_argument("--backbone-epochs", type=int, default=BackboneTrainingConfig.epochs)
    parser.add_argument("--backbone-lr", type=float, default=BackboneTrainingConfig.learning_rate)
    parser.add_argument("--backbone-batch-size", type=int, default=BackboneTrainingConfig.batch_size)
    parser.add_argument("--backbone-triplet-weight", type=float, default=BackboneTrainingConfig.triplet_weight)
    parser.add_argument("--head-epochs", type=int, default=HeadConfig.epochs)
    parser.add_argument("--head-lr", type=float, default=HeadConfig.learning_rate)
    parser.add_argument("--triplet-weight", type=float, default=HeadConfig.triplet_weight,
                        help="weight of the image triplet loss")
    parser.add_argument("--margin", type=float, default=HeadConfig.margin, help="triplet margin (cosine distance)")
    parser.add_argument("--report-weight", type=float, default=HeadConfig.report_weight,
                        help="weight of the report label loss against the image one")
    parser.add_argument("--doc2vec-dim", type=int, default=TrainConfig.doc2vec_dim)
    parser.add_argument("--doc2vec-epochs", type=int, default=TrainConfig.doc2vec_epochs)
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice in training")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda[:n]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the arguments describe (ModelError for out-of-range values)."""
    if not 0.0 <= args.report_fraction <= 100.0:
        raise ModelError(f"--report-fraction is a percentage 0-100, got {args.report_fraction}")
    return TrainConfig(
        image_size=args.image_size,
        scda=not args.no_scda,
        report_fraction=args.report_fraction / 100.0,
        doc2vec_dim=args.doc2vec_dim,
        doc2vec_epochs=args.doc2vec_epochs,
        backbone=BackboneTrainingConfig(
            epochs=args.backbone_epochs,
            batch_size=args.backbone_batch_size,
            learning_rate=args.backbone_lr,
            triplet_weight=args.backbone_triplet_weight,
            seed=args.seed,
        ),
        heads=HeadConfig(
            epochs=args.head_epochs,
            learning_rate=args.head_lr,
            triplet_weight=args.triplet_weight,
            margin=args.margin,
            seed=args.seed,
            report_weight=args.report_weight,
        ),
    )


def setup_process(threads: int) -> None:
    """Logging for a long command (gensim's chatter muted) and the torch CPU thread count (0: default)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gensim").setLevel(logging.WARNING)
    if threads > 0:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """Train and save; 0 on success, 2 on bad input."""
    setup_process(args.threads)
    try:
        config = config_from_args(args)
        samples = read_manifest(args.manifest)
        train, test = training_split(samples, args.test_fraction, args.split_seed)
        started = time.monotonic()
        model = train_model(
            train, config, Path(args.work_dir), device=args.device, init_backbone=args.init_backbone,
            progress=not args.no_progress,
        )
        model.training.update(
            manifest=Path(args.manifest).name,
            samples=len(train),
            held_out_samples=len(test),
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            **({"test_patients_sha256": held_out_digest(test)} if test else {}),
            train_seconds=round(time.monotonic() - started, 1),
        )
        model.save(args.out)
    except ModelError as exc:
        print(f"mmdl-node train: {exc}", file=sys.stderr)
        return 2
    print(f"saved model {model.version} to {args.out} ({len(train)} samples, {len(test)} held out)")
    return 0

