#!/usr/bin/env bash
# The GPU checks, as one script that fits in a few minutes of GPU time (run from the repository root):
#   bash benchmarks/gpu_checks.sh [sd15|sd35|all]      (default: all)
# sd15: an SD-1.5-shaped pipeline with random weights is built offline, then
#   1. sync_check.py: no host synchronisation inside a denoising step;
#   2. env_throughput.py: the environment and policy against a bare UNet + DDIM loop, with peak memory;
#   3. train_throughput.py: one DDPO-IS update (LoRA rank 4), batched against DDPO's timestep loop.
# sd35: an SD3.5-Medium-shaped pipeline (without T5, 512x512) is built offline, then env_throughput.py
#   against a bare transformer + FlowMatchEulerDiscreteScheduler loop, with peak memory.
# Each prints the card's name with its figures. Set OUT to keep the pipeline folders elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp}
WHICH=${1:-all}
case "$WHICH" in sd15|sd35|all) ;; *) echo "unknown section '$WHICH'; allowed: sd15, sd35, all" >&2; exit 2 ;; esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ "$WHICH" != sd35 ]]; then
  python benchmarks/shaped_pipelines.py --shape sd15 --out "$OUT/sd15-shaped"
  python benchmarks/sync_check.py --model "$OUT/sd15-shaped" --batch-size 4 --steps 10 || echo "sync check failed (above)"
  python benchmarks/env_throughput.py --model "$OUT/sd15-shaped" --batch-sizes 8 --steps 20 --episodes 3 --memory-episodes 10
  python benchmarks/train_throughput.py --model "$OUT/sd15-shaped" --num-envs 8 --steps 20 --minibatch 16 --lora-rank 4 --repeats 2
fi
if [[ "$WHICH" != sd15 ]]; then
  python benchmarks/shaped_pipelines.py --shape sd35-medium --out "$OUT/sd35-shaped"
  python benchmarks/env_throughput.py --model "$OUT/sd35-shaped" --batch-sizes 4 --steps 10 --episodes 3 --memory-episodes 10
fi
