#!/usr/bin/env bash
# The GPU check, for a session that is lent a GPU machine (the device tool), run from the repository
# root in one call: `OUT=$OUT bash benchmarks/gpu_check.sh` (about 5 minutes on one H200, plus the CUDA extension's first build).
# It uses that machine's own python3 (torch with CUDA, transformers, triton and pytest are in its
# image; nothing can be installed there) with this checkout on PYTHONPATH, and writes under $OUT:
#   gpu.txt         the card, driver and package versions
#   cuda_extension.log  csrc/'s tree attention built just in time (saguaro.kernels.build), before
#                   the tests so that its build time does not eat theirs
#   tests.log       the GPU tests: tree-attention kernels (Triton and the CUDA backend) against the
#                   reference, every engine on CUDA (greedy exact, sampling with a generator on either
#                   device, the Saguaro worker's placements, a tree through each attention backend),
#                   tree verification on the device against the walk
#   step_costs.*    random-weight step costs of Llama-3.1-8B / Llama-3.2-1B shaped models, bf16
#                   (target verify vs tokens, drafter batched steps, Triton and CUDA tree kernels vs SDPA)
#                   and the speeds projected from the CPU run's acceptance, labelled "projected"
#   tp_check.*      with 3+ GPUs: a tensor-parallel target (2 or 4 GPUs, NCCL) + drafter GPU, per method
# Each part runs under its own timeout and the script goes on after a failure, so one broken part
# does not cost the others; the timeouts add up to 540 s, so one
# GPU's check fits a 600 s device call. Commit what it measured with the card named (docs/RESULTS.md, GPU).
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT/configs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch, transformers, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "triton", triton.__version__)'
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

timeout 120 "$PY" -c 'import logging
logging.basicConfig(level=logging.INFO)
from saguaro.kernels.build import load_cuda_extension
print("built:", load_cuda_extension(verbose=True).__file__)' > "$OUT/cuda_extension.log" 2>&1
echo "CUDA extension: exit $? ($(tail -n 1 "$OUT/cuda_extension.log"))"

timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_csrc_compile.py tests/test_cuda.py tests/test_verify_tree.py \
  > "$OUT/tests.log" 2>&1
echo "tests: exit $? ($(tail -n 1 "$OUT/tests.log"))"

"$PY" - "$OUT/configs" <<'PY'
import sys
from transformers import LlamaConfig
shapes = {  # Llama-3.1-8B and Llama-3.2-1B (the Saguaro paper's drafter family), random weights
    "target": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "draft": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                  tie_word_embeddings=True),
}
for name, shape in shapes.items():
    LlamaConfig(**shape).save_pretrained(f"{sys.argv[1]}/{name}")
PY

timeout 220 "$PY" benchmarks/speedup.py --random-weights --device cuda --dtype bfloat16 \
  --target "$OUT/configs/target" --draft "$OUT/configs/draft" \
  --acceptance-from docs/results/cpu-bf16.json --no-progress --out "$OUT/step_costs.json" \
  > "$OUT/step_costs.log" 2>&1
echo "step costs: exit $? ($(tail -n 1 "$OUT/step_costs.log"))"

# Multi-GPU (only with 3 or more GPUs): the target sharded over 2 GPUs (4 with 5 or more) by
# transformers' tensor parallelism over NCCL, the drafter on the next GPU (benchmarks/tp_check.py):
# each method's greedy output against HF's on the same sharded target, tokens/s, hit rate.
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$GPUS" -ge 3 ]; then
  TP=$([ "$GPUS" -ge 5 ] && echo 4 || echo 2)
  timeout 300 "$PY" benchmarks/tp_check.py --tp "$TP" --out "$OUT/tp_check.json" > "$OUT/tp_check.log" 2>&1
  echo "multi-GPU (tp=$TP + drafter rank): exit $? ($(grep -c '"identical_to_hf_greedy": true' "$OUT/tp_check.log") of 4 methods identical to HF greedy)"
else
  echo "multi-GPU: skipped ($GPUS GPU(s); it needs 3: two target ranks and a drafter rank)"
fi
