"""Head variants compared at study level (own patient excluded), mean and spread over seeds, as Markdown.

    .venv/bin/python scripts/head_sweep.py MANIFEST CACHE_DIR [--split validation|test] [--only TEXT] [--seeds N ...]

``validation`` (the default, for choosing): heads retrained on 80 % of the TRAINING patients with each
variant of the shipped model's head recipe (models/mmdl_default), evaluated on the other 20 % (seed 1),
test patients untouched. ``test`` (for reporting a choice once): heads retrained on all training
patients, evaluated on the held-out patients. ``--only`` keeps the variants whose name contains TEXT.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.bundle import MMDLModel
from models.bundle_manifest import DEFAULT_MODEL_DIR
from models.metrics import retrieval_report
from models.datasets import read_manifest, split_by_patient
from models.study_sets import head_config, held_out_split, retrain_heads, study_set
from models.train import FeatureCache

# name: (changes to the head recipe, reports used, study vectors with reports)
VARIANTS = {
    "Image-MMDL (images only)": ({}, False),
    "MMDL (shipped recipe)": ({}, True),
    "MMDL, report loss x0.3": ({"report_weight": 0.3}, True),
    "MMDL, 40 epochs": ({"epochs": 40}, True),
    "Image-MMDL, 40 epochs": ({"epochs": 40}, False),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--only", default="")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = MMDLModel.load(DEFAULT_MODEL_DIR, device="cpu")
    train, test = held_out_split(read_manifest(args.manifest), model)
    fit_part, validation = split_by_patient(train, [0.8, 0.2], seed=1) if args.split == "validation" else (train, test)
    cache = FeatureCache(args.cache_dir)
    print("| variant | seeds | mAP@10 | mAP@all |\n|---|---|---|---|")
    for name, (changes, with_reports) in VARIANTS.items():
        if args.only not in name:
            continue
        runs = []
        for seed in args.seeds:
            config = replace(head_config(model, seed), **changes)
            fitted = retrain_heads(model, fit_part, cache, reports=with_reports, config=config)
            studies = study_set(validation, fitted, cache, "mmdl" if with_reports else "image")
            runs.append(retrieval_report(studies.vectors, studies.labels, groups=studies.patients))
        cells = [f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs]):.3f}" for k in ("map@10", "map@all")]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
