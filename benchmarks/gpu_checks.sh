#!/usr/bin/env bash
# The GPU checks, as one script that fits in a few minutes of GPU time (run from the repository root):
# an SD-1.5-shaped pipeline with random weights is built offline, then
#   1. sync_check.py: no host synchronisation inside a denoising step;
#   2. env_throughput.py: the environment and policy against a bare UNet + DDIM loop, with peak memory;
#   3. train_throughput.py: one DDPO-IS update (LoRA rank 4), batched against DDPO's timestep loop.
# Each prints the card's name with its figures. Set OUT to keep the pipeline folder elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/sd15-shaped}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python benchmarks/shaped_pipelines.py --shape sd15 --out "$OUT"
python benchmarks/sync_check.py --model "$OUT" --batch-size 4 --steps 10 || echo "sync check failed (above)"
python benchmarks/env_throughput.py --model "$OUT" --batch-sizes 8 --steps 20 --episodes 3 --memory-episodes 10
python benchmarks/train_throughput.py --model "$OUT" --num-envs 8 --steps 20 --minibatch 16 --lora-rank 4 --repeats 2
