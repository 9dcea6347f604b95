#!/bin/sh
# Reproduce the shipped model models/mmdl_default and its evaluation (models/MODEL_CARD.md).
#
#   scripts/train_default_model.sh [DATA_DIR] [RUN_DIR]
#
# DATA_DIR: the public sample data (default ../shared/data); RUN_DIR: manifest, checkpoints,
# feature cache and evaluation outputs (default runs/default). Rerunning resumes from RUN_DIR.
# CPU settings as measured on a 2-core machine; with a GPU (device auto) it is much faster.
set -eu
DATA=${1:-../shared/data}
RUN=${2:-runs/default}
PY=${PYTHON:-python}
MODEL=models/mmdl_default
mkdir -p "$RUN"
$PY -m models.commands.manifest --nih "$DATA/nih-cxr14-1000" --covid "$DATA/covid-chestxray" \
    --iu "$DATA/iu-reports/NLMCXR_reports.tgz" --out "$RUN/manifest.csv"
$PY -m models.commands.train --manifest "$RUN/manifest.csv" --out "$MODEL" --work-dir "$RUN/train" \
    --test-fraction 0.2 --split-seed 0 --seed 0 --image-size 128 --backbone-epochs 3 --head-epochs 20 \
    --threads 1 --no-progress
$PY -m models.commands.evaluate --manifest "$RUN/manifest.csv" --model "$MODEL" --out "$RUN/eval" \
    --cache-dir "$RUN/train/cache" --threads 1 --store-in-model --no-progress
cp "$DATA/nih-cxr14-1000/NIH_README_ChestXray.txt" "$DATA/nih-cxr14-1000/torchxrayvision_LICENSE.txt" "$MODEL/"
cp "$DATA/covid-chestxray/SOURCE_README.md" "$MODEL/covid-chestxray_SOURCE_README.md"
