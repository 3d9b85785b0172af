#!/usr/bin/env bash
# The GPU checks, as one script that fits in a few minutes of GPU time (run from the repository root):
#   bash benchmarks/gpu_checks.sh [sd15|sd35|all]      (default: all)
# sd15: an SD-1.5-shaped pipeline with random weights (shaped_pipelines.py), then
#   1. sync_check.py: no host synchronisation inside a denoising step;
#   2. env_throughput.py: the environment and policy against a bare UNet + DDIM loop, with peak memory;
#   3. train_throughput.py: one DDPO-IS update (LoRA rank 4), batched against DDPO's timestep loop.
# sd35: an SD3.5-Medium-shaped pipeline (without T5, 512x512), then env_throughput.py against a bare
#   transformer + FlowMatchEulerDiscreteScheduler loop, with peak memory.
# Each check builds its pipeline in memory on the GPU (--model shaped:NAME): nothing is written to
# disk. Each line of output is printed as it comes (python -u), each check after the time it starts,
# so that a run cut off by a time limit still says how far it got.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
WHICH=${1:-all}
case "$WHICH" in sd15|sd35|all) ;; *) echo "unknown section '$WHICH'; allowed: sd15, sd35, all" >&2; exit 2 ;; esac
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

check() {
  echo "[$(date +%T)] $*"
  python -u "$@"
}

if [[ "$WHICH" != sd15 ]]; then
  check benchmarks/env_throughput.py --model shaped:sd35-medium --batch-sizes 4 --steps 10 --episodes 3 --memory-episodes 10
fi
if [[ "$WHICH" != sd35 ]]; then
  check benchmarks/sync_check.py --model shaped:sd15 --batch-size 4 --steps 10 || echo "sync check failed (above)"
  check benchmarks/env_throughput.py --model shaped:sd15 --batch-sizes 8 --steps 20 --episodes 3 --memory-episodes 10
  check benchmarks/train_throughput.py --model shaped:sd15 --num-envs 8 --steps 20 --minibatch 16 --lora-rank 4 --repeats 2
fi
echo "[$(date +%T)] done"
