"""One training process of the data-parallel tests; the launcher starts one per rank.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py TABLES_JSON OUT_DIR [--die-after-epoch E]

Each rank builds the run of the config tables ``TABLES_JSON`` and trains its epochs step by step
as ``Run.train_epoch`` does, writing after each epoch ``OUT_DIR/rank{r}-epoch{e}.pt``: the trainable
parameters after the update, and the samples' initial latents x_T, groups, rewards and prompts
with the advantages this rank trained on. With ``--die-after-epoch E`` rank 1 kills itself
(SIGKILL, as an out-of-memory killer would) after epoch E, and the other ranks go on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch

from agents.config import TrainConfig
from agents.train import Run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tables", type=json.loads)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--die-after-epoch", type=int, default=None)
    args = parser.parse_args()
    run = Run(TrainConfig.from_tables(args.tables))
    rank = run.processes.rank
    while run.epoch < run.config.run.epochs:
        samples = run.collect()
        outcomes, advantages = run.shared_advantages(samples)
        run.update(samples, outcomes, advantages)
        torch.save(
            {
                "parameters": {name: p.detach().clone() for name, p in run.trainable.items()},
                "initial_latents": samples.latents[:, 0].clone(),
                "groups": samples.groups.clone(),
                "rewards": samples.rewards.clone(),
                "prompts": samples.prompts,
                "advantages": advantages.clone(),
            },
            args.out_dir / f"rank{rank}-epoch{run.epoch}.pt",
        )
        if rank == 1 and run.epoch == args.die_after_epoch:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
