"""`mmdl-node evaluate`: retrieval metrics of a model and its baselines on a held-out patient split.

Example (the evaluation in models/MODEL_CARD.md)::

    mmdl-node evaluate --manifest runs/manifest.csv --model models/mmdl_default --out runs/eval \
        --test-fraction 0.2

Writes metrics.json (``{method: {"map@10": ..., ...}}``), metrics.md and PNG plots to ``--out``.
Use the ``--test-fraction``/``--split-seed`` the model was trained with, so test patients are unseen;
a model that records ``test_patients_sha256`` refuses a manifest or split whose test patients differ.

``--studies`` evaluates instead what the node serves (``models.evaluate.evaluate_studies``): study
vectors built by the node's function, the query's own patient excluded, heads retrained per seed
(``--seeds``, mean and spread); it writes metrics-studies.json and metrics-studies.md::

    mmdl-node evaluate --studies --seeds 0 1 2 --manifest runs/manifest.csv --model models/mmdl_default \
        --out runs/eval-studies --cache-dir runs/default/train/cache
``--store-in-model`` also records the metrics in the model directory (its metrics.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.bundle import MMDLModel
from models.commands.train import setup_process
from models.datasets import read_manifest
from models.errors import ModelError
from models.evaluate import evaluate, evaluate_studies
from models.train import REPORT_FRACTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmdl-node evaluate`."""
    parser.add_argument("--manifest", required=True, help="CSV manifest (the one the model was trained from)")
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--out", required=True, help="folder for metrics.json, metrics.md and plots")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="share of patients in the test split (default: the model's own held-out share)")
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the patient split (default: the model's)")
    parser.add_argument("--coverage", type=float, nargs="*", default=[f * 100 for f in REPORT_FRACTIONS],
                        help="percentages of training reports for the coverage experiment (none to skip)")
    parser.add_argument("--cache-dir", type=Path, help="image feature cache (default: OUT/cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random floor and retrained heads")
    parser.add_argument("--studies", action="store_true",
                        help="study-level mode: study vectors as the node builds them, own patient excluded")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the retrained heads in --studies mode (default 0 1 2)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda[:n]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--store-in-model", action="store_true", help="also save the metrics into the model directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Evaluate; 0 on success, 2 on bad input."""
    setup_process(args.threads)
    try:
        if any(not 0 < p <= 100 for p in args.coverage):
            raise ModelError(f"--coverage takes percentages in (0, 100], got {args.coverage}")
        model = MMDLModel.load(args.model, device=args.device)
        if args.studies:
            return _studies(args, model)
        test_fraction = args.test_fraction if args.test_fraction is not None else model.training.get("test_fraction")
        split_seed = args.split_seed if args.split_seed is not None else model.training.get("split_seed", 0)
        if not test_fraction:
            raise ModelError("the model records no held-out split; give --test-fraction (and --split-seed)")
        results = evaluate(
            read_manifest(args.manifest), model, Path(args.out), float(test_fraction), int(split_seed),
            cache_dir=args.cache_dir, coverage=[p / 100 for p in args.coverage], seed=args.seed,
            progress=not args.no_progress,
        )
        if args.store_in_model:
            model.metrics = results
            model.save(args.model)
    except ModelError as exc:
        print(f"mmdl-node evaluate: {exc}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{name} {values['map@10']:.3f}" for name, values in results.items())
    print(f"mAP@10 on {next(iter(results.values()))['queries']} test queries: {summary}; written to {args.out}")
    return 0



def _studies(args: argparse.Namespace, model: MMDLModel) -> int:
    """The study-level mode (ModelError propagates to ``run``)."""
    results = evaluate_studies(read_manifest(args.manifest), model, Path(args.out), cache_dir=args.cache_dir,
                               seeds=args.seeds, progress=not args.no_progress)
    summary = ", ".join(f"{name} {values['map@10']['mean']:.3f}" for name, values in results.items())
    print(f"study-level mAP@10 (mean over {len(args.seeds)} seeds): {summary}; written to {args.out}")
    return 0
