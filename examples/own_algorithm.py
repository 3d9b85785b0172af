"""Adding a training algorithm as one module, the way GRPO was added.

    python examples/own_algorithm.py --epochs 2

An algorithm of ``python -m agents.train`` is one module with

1. a config dataclass: each field, with its default and ``metadata={"help": ...}``, becomes a
   setting of the ``[algorithm]`` table and a command-line flag;
2. ``update(context, samples, advantages) -> figures``: trains ``context.policy`` on one epoch's
   trajectories (:class:`agents.algorithms.UpdateContext` holds the optimiser, generator,
   reference policy and epoch);
3. optionally ``advantages(outcomes, config) -> (B,)``, when the training command's per-prompt
   or batch statistics are not what it needs (``outcomes``: the rewards, groups and prompts of
   the epoch's samples, of every process in a data-parallel run);
4. one call of ``register_algorithm``.

``agents/algorithms/grpo.py`` is exactly that: ``GRPOConfig``, ``grpo_update`` (the steps to
train from ``samples.trained_steps`` and the config's sliding window, the objective from
``agents.losses.importance_sampled_loss``, the optimiser steps, KL penalty and early stop from
``agents.algorithms.base.policy_gradient_pass``, which also keeps the processes of a
data-parallel run in step: pass it ``processes=context.processes``), ``advantages`` (its groups' statistics from
``samples.groups``) and ``register_algorithm("grpo", ...)``; the project adds one import line in
``agents/algorithms/__init__.py``, a user's script imports its module before training.

Here, on the same pieces: RLOO (Kool et al., 2019; Ahmadian et al., 2024), whose baseline is
the mean reward of the *other* samples of the same prompt (leave one out).
"""

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agents.algorithms import UpdateContext, register_algorithm
from agents.algorithms.base import mean_figures, policy_gradient_pass
from agents.config import TrainConfig
from agents.losses import importance_sampled_loss
from agents.rollouts import Outcomes, Trajectories
from agents.step_window import StepWindow
from agents.train import train


@dataclass
class RLOOConfig:
    """RLOO's settings."""

    clip_range: float = field(default=1e-3, metadata={"help": "PPO clip epsilon of the per-dimension ratio"})
    minibatch_size: int = field(default=32, metadata={"help": "(sample, timestep) pairs per network call"})


def leave_one_out(samples: Outcomes, config: RLOOConfig) -> torch.Tensor:
    """Each reward minus the mean reward of the other samples of its group (the prompt's samples of the batch)."""
    rewards = samples.rewards.float()
    _, index, counts = torch.unique(samples.groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), device=rewards.device).index_add_(0, index, rewards)
    others = (sums[index] - rewards) / (counts[index] - 1).clamp(min=1)
    return rewards - others


def rloo_update(context: UpdateContext, samples: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
    """One optimiser step on the clipped surrogate over every stochastic step after the branch step."""
    config: RLOOConfig = context.config
    steps = samples.trained_steps(StepWindow(), context.policy.sampler)

    def objective(
        log_probs: torch.Tensor, batch: torch.Tensor, batch_steps: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        old_log_probs = samples.log_probs[batch, batch_steps]
        return importance_sampled_loss(log_probs, old_log_probs, advantages[batch], actions, config.clip_range, True)

    minibatches = list(samples.minibatches(config.minibatch_size, context.generator, steps))
    figures: dict[str, list[float]] = {}
    context.policy.train()
    policy_gradient_pass(
        context.policy, context.optimizer, samples, minibatches, objective, figures,
        name="RLOO", accumulation=len(minibatches), max_grad_norm=context.max_grad_norm, processes=context.processes,
    )
    context.policy.eval()
    return mean_figures(figures)


register_algorithm(
    "rloo", RLOOConfig, rloo_update, advantages=leave_one_out, overwrite=True,
    description="RLOO: the leave-one-out baseline of a prompt's samples (Ahmadian et al., 2024)",
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="tiny-random", help="registered model name (shapes32: the built-in model)")
    args = parser.parse_args()
    config = TrainConfig.from_tables({
        "run": {"epochs": args.epochs, "device": "cpu"},
        "env": {"model": args.model, "num_envs": 8, "samples_per_prompt": 4, "batches_per_epoch": 1,
                "num_inference_steps": 4, "shared_noise": True},
        "algorithm": {"name": "rloo", "minibatch_size": 16},
    })
    with tempfile.TemporaryDirectory() as folder:
        history = train(config, Path(folder))
    for epoch, figures in enumerate(history, start=1):
        print(f"epoch {epoch}: mean reward {figures['charts/reward_mean']:.4f}, loss {figures['losses/loss']:.3g}")
