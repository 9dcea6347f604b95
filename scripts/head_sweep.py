"""Head variants compared at study level on a validation split of the TRAINING patients (test untouched).

    .venv/bin/python scripts/head_sweep.py MANIFEST CACHE_DIR [SEEDS...]

Heads are retrained on the other training patients with each variant of the shipped model's head
recipe (models/mmdl_default) and each seed; prints mAP@10 / mAP@all at study level (own patient
excluded), mean and spread over the seeds, as Markdown.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from models.bundle import DEFAULT_MODEL_DIR, MMDLModel
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
}


def main(manifest: str, cache_dir: str, *seeds: str) -> None:
    torch.set_num_threads(1)
    model = MMDLModel.load(DEFAULT_MODEL_DIR, device="cpu")
    train, _ = held_out_split(read_manifest(manifest), model)
    fit_part, validation = split_by_patient(train, [0.8, 0.2], seed=1)
    cache = FeatureCache(Path(cache_dir))
    print("| variant | seeds | mAP@10 | mAP@all |\n|---|---|---|---|")
    for name, (changes, with_reports) in VARIANTS.items():
        runs = []
        for seed in (int(s) for s in seeds or ("0", "1")):
            config = replace(head_config(model, seed), **changes)
            fitted = retrain_heads(model, fit_part, cache, reports=with_reports, config=config)
            studies = study_set(validation, fitted, cache, "mmdl" if with_reports else "image")
            runs.append(retrieval_report(studies.vectors, studies.labels, groups=studies.patients))
        cells = [f"{np.mean([r[k] for r in runs]):.3f} ± {np.std([r[k] for r in runs]):.3f}" for k in ("map@10", "map@all")]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
