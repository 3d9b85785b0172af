"""Where does a DDPO-IS gradient come from? Its norm per denoising step, on one batch.

    python benchmarks/gradient_by_step.py --config agents/configs/compressibility.toml

Collects one epoch of samples with the pretrained policy (as ``agents.train`` does), turns the
rewards into advantages, and for each step k backpropagates the clipped surrogate loss of all
samples at that step alone (at the sampling policy, where the ratio is 1). Prints sigma_t, the
gradient norm of the step's loss and its share of the sum over steps. The gradient of
log N(x; mu, sigma^2 I) with respect to mu is (x - mu) / sigma^2 = z / sigma, so steps with a
small sigma_t weigh in with large, noisy gradients.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from agents.losses import clipped_surrogate_loss
from agents.train import Run, TrainConfig, read_config_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a TrainConfig TOML file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = TrainConfig(**{**read_config_file(args.config), "device": args.device, "monitor": None})
    run = Run(config)
    samples = run.collect()
    advantages = run.advantages(samples)
    num_dims = math.prod(samples.latents.shape[2:])
    indices = torch.arange(samples.batch_size, device=samples.latents.device)
    norms = []
    for step in range(samples.num_steps):
        steps = torch.full_like(indices, step)
        run.optimizer.zero_grad(set_to_none=True)
        log_probs = run.policy.log_prob(samples.observations(indices, steps), samples.actions(indices, steps))
        loss, _ = clipped_surrogate_loss(
            log_probs, samples.log_probs[indices, steps], advantages, config.clip_range,
            num_dims if config.per_dimension_ratio else None,
        )
        loss.backward()
        norms.append(float(torch.sqrt(sum(p.grad.square().sum() for p in run.trainable.values() if p.grad is not None))))
    total = sum(norms)
    print(f"{samples.batch_size} samples, {config.reward}, {len(run.trainable)} trainable tensors")
    print("| step | timestep | sigma_t | gradient norm | share |")
    print("|---:|---:|---:|---:|---:|")
    for step, norm in enumerate(norms):
        sigma = float(run.policy.transition.sigma[step])
        print(f"| {step} | {int(samples.timesteps[0, step])} | {sigma:.4f} | {norm:.3g} | {norm / total:.1%} |")


if __name__ == "__main__":
    main()
