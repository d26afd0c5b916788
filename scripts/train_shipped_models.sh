#!/usr/bin/env bash
# How the shipped models in LightFusionLib/Resources/Models were made (see LightFusionLib/Resources/Models/README.md).
# 1. The quality study (scripts/quality_study.py: screening, PET fold rotation, full-length confirmation and
#    cross-task runs, all on held-out cases), 2. final models on all training pairs with the chosen recipe,
# 3. ONNX export (Testing/test_onnx.py checks each shipped ONNX model against its .pt),
#    4. the models replace the shipped ones.
# Recipe (the `lightfusion train` defaults): Adam, lr 3e-3 with cosine decay to 0, batch 4, random 64x64 crops
# with flips, seed 0, the task's loss preset (eq. 5 for PET/SPECT, Table 5 for CT), 200 epochs (CT-MRI: 60 on all
# three tasks' pairs first, then 400).
# Needs ../shared beside the repo. On the 2-core CPU: the study about 9 h (two single-thread trainings at a
# time; Stage 3 one at a time), the final models about 80 min. STAGES=final runs only steps 2-4.
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data/harvard/train
PY=${PYTHON:-python}
OUT=runs/shipped
mkdir -p "$OUT"
if [ "${STAGES:-all}" = all ]; then
  $PY scripts/quality_study.py screen --workers 2
  $PY scripts/quality_study.py folds --workers 2
  $PY scripts/quality_study.py confirm --workers 2
  $PY scripts/quality_study.py cross
  $PY scripts/quality_study.py extend
  $PY scripts/quality_study.py confirm --tasks ct-mri --variants lr3e-3-cosine --fold 1 --workers 1
  $PY scripts/quality_study.py extend --fold 1
  $PY scripts/quality_study.py extend --tasks spect-mri
  $PY scripts/quality_study.py extend --tasks pet-mri --variants epochs-200
  $PY scripts/quality_study.py confirm --tasks spect-mri --variants lr3e-3-cosine --fold 1 --workers 1
  $PY scripts/quality_study.py extend --tasks spect-mri --variants epochs-200 --fold 1
  $PY scripts/quality_study.py table > "$OUT/study-tables.md"
fi
train() {  # task, epochs: one thread each, so that two run side by side on the two cores
  local t=$1 epochs=$2 T
  T=$(echo "$t" | tr a-z A-Z)
  lightfusion train --data "$D/$T" --task "$t" --out "$OUT/$t.pt" --epochs "$epochs" --threads 1 --val-every 1000 --force
}
train pet-mri 200 &
train spect-mri 200 &
wait
# CT-MRI (study stage 3): 60 epochs on the pairs of all three tasks with CT's loss, then CT's 400 from there
lightfusion train --data "$D" --task ct-mri --extra-task pet-mri --extra-task spect-mri --out "$OUT/ct-all-tasks.pt" \
  --epochs 60 --threads 2 --val-every 1000 --force
lightfusion train --data "$D/CT-MRI" --task ct-mri --init "$OUT/ct-all-tasks.pt" --out "$OUT/ct-mri.pt" --epochs 400 \
  --threads 2 --val-every 1000 --force
for t in pet-mri spect-mri ct-mri; do
  lightfusion export-onnx --model "$OUT/$t.pt" -o "$OUT/$t.onnx"
done
cp "$OUT"/{pet-mri,spect-mri,ct-mri}.{pt,onnx} LightFusionLib/Resources/Models/
