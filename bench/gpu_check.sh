#!/usr/bin/env bash
# The device check: run it whenever a GPU is available and report its output (never a test
# dependency). Under 8 minutes on one H100/H200:
#   1. quantize two blocks of smollm2-135m on CUDA and on the CPU: code-bit agreement, block
#      output MSE, seconds per stage (bench/gpu_check.py);
#   2. the Triton kernels compiled for this GPU, against the torch reference
#      (tests/kernels, without TRITON_INTERPRET);
#   3. decode speed of a synthetic LQ-24/10 smollm2-135m, and of two blocks with
#      Llama-3-70B's shapes, against dense fp16 (bench/decode.py): the measured counterpart
#      of bench/results/kernel_static.md's predicted table;
#   4. a quick LQ-24/10 quantize + pack of smollm2-135m on CUDA, then `liftq eval --speed`:
#      tokens/s and peak memory beside fp16, and the peak against `liftq plan`'s prediction.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (writes OUT_DIR/*.json; default: a temp dir)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
unset TRITON_INTERPRET
status=0
step() { echo; echo "== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' || status=1
# the CUDA context (liftq plan's 700 MiB is an estimate until this measures it): device memory
# in use after the context and a first kernel exist, before any tensor of ours
"$PY" -c 'import torch; torch.zeros(1, device="cuda").add_(1); torch.cuda.synchronize(); f, t = torch.cuda.mem_get_info(); print(f"CUDA context: {(t - f) / 2**20:.0f} MiB in use (torch allocated {torch.cuda.memory_allocated() / 2**20:.1f} MiB)")' || status=1

step "quantize: CUDA against CPU"
timeout 300 "$PY" bench/gpu_check.py --json "$OUT/quantize.json" || status=1

step "kernels on the GPU"
timeout 180 "$PY" -m pytest -q tests/kernels || status=1

step "decode speed"
timeout 120 "$PY" bench/decode.py --synthetic smollm2-135m --config LQ-24/10 --device cuda \
  --new-tokens 32 --json "$OUT/decode.json" || status=1
timeout 180 "$PY" bench/decode.py --synthetic llama-3-70b --layers 2 --config LQ-24/10 \
  --device cuda --new-tokens 16 --reps 20 --json "$OUT/decode_70b.json" || status=1
timeout 180 "$PY" bench/decode.py --synthetic llama-3.1-405b --layers 1 --vocab 32000 \
  --config LQ-24/10 --device cuda --new-tokens 8 --reps 10 --json "$OUT/decode_405b.json" || status=1

step "eval --speed: peak memory against the plan"
timeout 240 .venv/bin/liftq quantize smollm2-135m --config LQ-24/10 --nsamples 8 --seqlen 128 \
  --whiten-steps 0 --correction-steps 0 --device cuda --out "$OUT/quantized" >/dev/null \
  && .venv/bin/liftq pack "$OUT/quantized" --out "$OUT/packed" >/dev/null \
  && timeout 120 .venv/bin/liftq eval "$OUT/packed" --speed --device cuda --kld-ref smollm2-135m \
       --prompt 512 --new-tokens 64 --json > "$OUT/speed.json" && cat "$OUT/speed.json" || status=1

echo; echo "gpu check: $([ $status = 0 ] && echo PASS || echo FAIL) (results in $OUT)"
exit $status
