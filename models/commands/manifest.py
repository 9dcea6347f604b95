"""`mmdl-node manifest`: build one CSV manifest from the training sources, reproducibly.

Example (the shipped model's training data, DATA being the folder that holds the public sets)::

    mmdl-node manifest --nih DATA/nih-cxr14-1000 --covid DATA/covid-chestxray \
        --iu DATA/iu-reports/NLMCXR_reports.tgz --out data/manifest.csv

Sources are read in a fixed order (NIH, COVID, IU, MIMIC-CXR-JPG, CheXpert) and written in that
order, so the same inputs always give the same file. Labels of report sources come from the
labeler under ``--policy`` (U-Zero by default); see docs/LABEL_MAPPINGS.md for the image sources.
Prints sample counts per source (never report text).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from models.datasets import read_chexpert, read_covid, read_iu_reports, read_mimic, read_nih, write_manifest
from models.errors import ModelError
from models.labeler import Policy
from models.observations import Sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mmdl-node manifest`."""
    parser.add_argument("--nih", help="NIH ChestX-ray14 folder (with labels.csv) or the labels.csv itself")
    parser.add_argument("--covid", help="COVID set folder (with records.csv) or the records.csv itself")
    parser.add_argument("--iu", help="Open-i/IU NLMCXR_reports.tgz")
    parser.add_argument("--mimic", help="MIMIC-CXR-JPG root (mimic-cxr-2.0.0-chexpert.csv + files/)")
    parser.add_argument("--mimic-reports", help="folder of MIMIC-CXR report .txt files (optional)")
    parser.add_argument("--chexpert", help="CheXpert train.csv or valid.csv")
    parser.add_argument("--policy", choices=[p.value for p in Policy if p is not Policy.U_IGNORE],
                        default=Policy.U_ZERO.value, help="uncertainty policy for labeler/CSV labels")  # fmt: skip
    parser.add_argument("--out", required=True, help="manifest CSV to write")


def collect(args: argparse.Namespace) -> list[Sample]:
    """All samples of the sources named in ``args``, in the fixed source order."""
    samples: list[Sample] = []
    if args.nih:
        samples += read_nih(args.nih)
    if args.covid:
        samples += read_covid(args.covid)
    if args.iu:
        samples += read_iu_reports(args.iu, args.policy)
    if args.mimic:
        samples += read_mimic(args.mimic, args.policy, reports=args.mimic_reports)
    if args.chexpert:
        samples += read_chexpert(args.chexpert, args.policy)
    return samples


def run(args: argparse.Namespace) -> int:
    """Build the manifest; 0 on success, 2 on a bad source or no source."""
    if not any((args.nih, args.covid, args.iu, args.mimic, args.chexpert)):
        print("mmdl-node manifest: name at least one source (--nih, --covid, --iu, --mimic, --chexpert)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        samples = collect(args)
        write_manifest(samples, args.out)
    except ModelError as exc:
        print(f"mmdl-node manifest: {exc}", file=sys.stderr)
        return 2
    counts = Counter(s.source for s in samples)
    summary = ", ".join(f"{source} {n}" for source, n in counts.items())
    print(f"wrote {len(samples)} samples ({summary}) to {args.out}")
    return 0

