"""`mmdl-node calibrate`: fit calibrated findings and the match probability of a model, store them in its model.json.

Example (the calibration of models/mmdl_default)::

    mmdl-node calibrate --manifest runs/default/manifest.csv --model models/mmdl_default \
        --cache-dir runs/default/train/cache

Uses the manifest the model was trained from: the held-out patients are recognised by the model's
split (and its ``test_patients_sha256`` when recorded) and left untouched; the calibration is fitted
on a validation split of the training patients (``models.study_sets.calibrate_model``). Also records
``test_patients_sha256`` in the model when it has none, so ``evaluate`` can check the split later.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.bundle import MMDLModel, update_manifest
from models.commands.train import setup_process
from models.datasets import read_manifest
from models.errors import ModelError
from models.study_sets import calibrate_model, held_out_split, held_out_digest
from models.train import FeatureCache


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmdl-node calibrate`."""
    parser.add_argument("--manifest", required=True, help="CSV manifest the model was trained from")
    parser.add_argument("--model", required=True, help="model directory (its model.json is updated)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of the training patients the calibration is fitted on (default 0.2)")
    parser.add_argument("--validation-seed", type=int, default=1, help="seed of the validation split (default 1)")
    parser.add_argument("--cache-dir", type=Path, required=True, help="image feature cache")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda[:n]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Fit and store; 0 on success, 2 on bad input."""
    setup_process(args.threads)
    try:
        samples = read_manifest(args.manifest)
        model = MMDLModel.load(args.model, device=args.device)
        _, test = held_out_split(samples, model)
        calibration = calibrate_model(samples, model, FeatureCache(args.cache_dir), args.validation_fraction,
                                      args.validation_seed, progress=not args.no_progress)
        update_manifest(args.model, calibration, {"test_patients_sha256": held_out_digest(test)})
    except ModelError as exc:
        print(f"mmdl-node calibrate: {exc}", file=sys.stderr)
        return 2
    shown = [f.name for f in calibration.findings if f.slope is not None]
    print(f"calibrated {len(shown)} findings ({', '.join(shown)}) on {calibration.fitted_on['studies']} studies; "
          f"stored in {Path(args.model) / 'model.json'}")
    return 0
