#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA peak memory and tokens/s of full, full +
# checkpointing, LoRA, SlimFit default and best on SmolLM2's and the 536M Llama's geometry in
# bf16, the estimate's prediction beside each; JSON in $OUT (or benchmarks/results/gpu/).
# At most 8 minutes on one GPU: run it whenever a GPU is lent. Never required by tests.
#
#   benchmarks/gpu_check.sh              # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run    # CPU, tiny geometries, one step per arm (DRY_RUN=1 too)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
args=()
dry=${DRY_RUN:-0}
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry=1; else args+=("$arg"); fi
done
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$dry" = "1" ]; then
  exec "$PYTHON" benchmarks/gpu_check.py --dry-run "${args[@]}"
fi
# the whole run stays inside the 8-minute budget even if an arm hangs
exec timeout --signal=INT --kill-after=20 470 "$PYTHON" benchmarks/gpu_check.py "${args[@]}"
