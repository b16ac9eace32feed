#!/usr/bin/env bash
# One prepared run on a lent GPU machine (it has torch, torchvision, timm, typer, rich, safetensors;
# nothing can be downloaded there): the CUDA tests, then `gpd verify --device cuda` over the models of
# the CUDA issue at ratio 2, 1.5 and with branches, with wall times; results go to $OUT/gpu.md
# (copy it to docs/gpu.md). Usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PY:-python}
{
  echo "# gpd-surgery on a GPU"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo '```'
  echo
  echo "## CUDA tests"
  echo
  echo '```'
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py -m cuda 2>&1 | tail -5
  echo '```'
  echo
  echo "## gpd verify --device cuda"
  echo
  echo "| model | ratio | branches | float32 rel | float64 rel | extraction f64 | expand s | verify s | train step s |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
} > "$OUT/gpu.md"
for spec in resnet50 mobilenet_v3_large efficientnet_b0 vit_b_16 swin_t convnext_tiny; do
  for rb in "2 none" "1.5 none" "2 default"; do
    set -- $rb
    timeout 240 $PY scripts/gpu_one.py "$spec" "$1" "$2" >> "$OUT/gpu.md" 2>> "$OUT/errors.log" \
      || echo "| $spec | $1 | $2 | error | | | | | |" >> "$OUT/gpu.md"
  done
done
{
  echo
  echo "## gpd train --amp: the GPD step against separate teacher + student steps"
  echo
  echo "Batch 64 at 224x224, ratio 2, default branches, channels-last; median of 10 steps after 3 warm-up;"
  echo "each cell: GPD step / separate steps (ratio)."
  echo
  echo "| model | --amp off | --amp bf16 | --amp fp16 |"
  echo "|---|---:|---:|---:|"
} >> "$OUT/gpu.md"
for spec in resnet18 resnet50 mobilenet_v3_large vit_b_16; do
  timeout 240 $PY scripts/gpu_one.py amp "$spec" >> "$OUT/gpu.md" 2>> "$OUT/errors.log" \
    || echo "| $spec | error | | |" >> "$OUT/gpu.md"
done
cat "$OUT/gpu.md"
