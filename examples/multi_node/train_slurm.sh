#!/usr/bin/env bash
# Data-parallel training over several machines with SLURM: one task per machine, each task runs
# `accelerate launch`, which starts one process per GPU of its machine.
#
#   sbatch --nodes 2 examples/multi_node/train_slurm.sh agents/configs/sd15_aesthetic.toml /shared/runs/aesthetic
#
# Every machine needs: this repository installed in the same environment, the model's weights
# (a shared Hugging Face cache, or HF_HUB_OFFLINE=1 with a local copy), and the output folder on a
# file system they all see (rank 0 writes the checkpoints; every rank reads them on --resume).
# Learned rewards are loaded on every process, or served once by a reward server (docs: Rewards).
#SBATCH --job-name=diffusion-env-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
CONFIG=${1:?usage: train_slurm.sh CONFIG_TOML OUTPUT_DIR [--resume]}
OUTPUT_DIR=${2:?usage: train_slurm.sh CONFIG_TOML OUTPUT_DIR [--resume]}
shift 2
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export HF_HUB_OFFLINE=1

# $SLURM_NODEID is expanded by each task, on its own machine.
srun bash -c "accelerate launch \
    --multi_gpu \
    --num_machines $SLURM_NNODES \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR \
    --main_process_port 29500 \
    --mixed_precision bf16 \
    --dynamo_backend no \
    -m agents.train --config $CONFIG --output-dir $OUTPUT_DIR $*"
