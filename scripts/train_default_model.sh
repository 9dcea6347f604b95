#!/bin/sh
# Reproduce the shipped model models/mmdl_default and its evaluation (models/MODEL_CARD.md).
#
#   scripts/train_default_model.sh [DATA_DIR] [RUN_DIR]
#
# DATA_DIR: the public sample data (default ../shared/data); RUN_DIR: manifest, checkpoints,
# feature cache and evaluation outputs (default runs/default). Rerunning resumes from RUN_DIR.
# CPU settings as measured on a shared 2-core machine (about 45 min); with a GPU (device auto) it is
# much faster. SCDA is off for this model: on a validation split of the training patients, SCDA crops
# of this small from-scratch backbone retrieved worse than whole images (see models/MODEL_CARD.md).
set -eu
DATA=${1:-../shared/data}
RUN=${2:-runs/default}
PY=${PYTHON:-python}
MODEL=models/mmdl_default
mkdir -p "$RUN"
$PY -m dicom_node.cli manifest --nih "$DATA/nih-cxr14-1000" --covid "$DATA/covid-chestxray" \
    --iu "$DATA/iu-reports/NLMCXR_reports.tgz" --out "$RUN/manifest.csv"
$PY -m dicom_node.cli train --manifest "$RUN/manifest.csv" --out "$MODEL" --work-dir "$RUN/train" \
    --test-fraction 0.2 --split-seed 0 --seed 0 --image-size 128 --backbone-epochs 8 --head-epochs 20 --no-scda \
    --threads 1 --no-progress
$PY -m dicom_node.cli calibrate --manifest "$RUN/manifest.csv" --model "$MODEL" --cache-dir "$RUN/train/cache" \
    --threads 1 --no-progress
$PY -m dicom_node.cli evaluate --manifest "$RUN/manifest.csv" --model "$MODEL" --out "$RUN/eval" \
    --cache-dir "$RUN/train/cache" --threads 1 --store-in-model --no-progress
$PY -m dicom_node.cli evaluate --studies --seeds 0 1 2 --manifest "$RUN/manifest.csv" --model "$MODEL" \
    --out "$RUN/eval-studies" --cache-dir "$RUN/train/cache" --threads 1 --no-progress
cp "$DATA/nih-cxr14-1000/NIH_README_ChestXray.txt" "$DATA/nih-cxr14-1000/torchxrayvision_LICENSE.txt" "$MODEL/"
cp "$DATA/covid-chestxray/SOURCE_README.md" "$MODEL/covid-chestxray_SOURCE_README.md"
cat > "$MODEL/iu-reports_LICENSE_NOTE.txt" <<'NOTE'
The report encoder (doc2vec.model) and the report side of the heads were trained on the text of the
Indiana University chest X-ray reports (Open-i, NLMCXR_reports.tgz, National Library of Medicine).
Every report XML states its licence: open-access, Creative Commons Attribution-NonCommercial-NoDerivatives
4.0 International (CC BY-NC-ND 4.0), http://creativecommons.org/licenses/by-nc-nd/4.0/
Cite: Demner-Fushman D, et al. Preparing a collection of radiology examinations for distribution and
retrieval. J Am Med Inform Assoc. 2016;23(2):304-310. Non-commercial use only; doc2vec.model holds the
reports' vocabulary and per-report training vectors, not their text.
NOTE
