"""Where does a DDPO-IS gradient come from, and how much of it is signal? Per denoising step.

    python benchmarks/gradient_by_step.py --config agents/configs/compressibility.toml
    python benchmarks/gradient_by_step.py --config agents/configs/alignment.toml --batches 3
    python benchmarks/gradient_by_step.py --run runs/compressibility:20

Collects epochs of samples with the pretrained policy (as ``agents.train`` does; with ``--run``,
with a training run's policy at its latest checkpoint, or that of EPOCH), turns the
rewards into advantages, and for each step k backpropagates the clipped surrogate loss of all
samples at that step alone (at the sampling policy, where the ratio is 1). Prints sigma_t, the
gradient norm of the step's loss and its share of the sum over steps. The gradient of
log N(x; mu, sigma^2 I) with respect to mu is (x - mu) / sigma^2 = z / sigma, so steps with a
small sigma_t weigh in with large, noisy gradients.

With ``--batches N`` (N >= 2) it collects N independent epochs and prints, for windows of
consecutive steps, the mean cosine similarity between the epochs' gradients. One epoch's
gradient is the expected gradient plus sampling noise; two independent epochs share only the
former, so a mean cosine near 0 says that one epoch's update is mostly noise.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from agents.algorithms.ddpo import DDPOConfig, surrogate_loss
from agents.config import ConfigError, TrainConfig, read_config_file
from agents.runs import load_run
from agents.train import Run


def gradients_by_step(run: Run) -> list[torch.Tensor]:
    """One epoch of samples; the flattened gradient of each step's DDPO-IS surrogate loss."""
    config = run.config.algorithm.config
    if not isinstance(config, DDPOConfig):
        raise ValueError(f"algorithm {run.config.algorithm.name!r} has no DDPO surrogate; allowed: ddpo-is or ddpo-sf")
    samples = run.collect()
    advantages = run.advantages(samples)
    indices = torch.arange(samples.batch_size, device=samples.latents.device)
    gradients = []
    for step in range(samples.num_steps):
        steps = torch.full_like(indices, step)
        run.optimizer.zero_grad(set_to_none=True)
        actions = samples.actions(indices, steps)
        log_probs = run.policy.log_prob(samples.observations(indices, steps), actions)
        loss, _ = surrogate_loss(config, log_probs, samples.log_probs[indices, steps], advantages, actions)
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in run.trainable.values() if p.grad is not None]))
    return gradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="a training config TOML file (the pretrained policy)")
    source.add_argument("--run", help="a training run's folder, DIR or DIR:EPOCH (its policy at that checkpoint)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batches", type=int, default=1, help="independent epochs of samples (>= 2: cosines too)")
    parser.add_argument("--window", type=int, default=6, help="consecutive steps per window of the cosine table")
    args = parser.parse_args()
    if args.batches < 1 or args.window < 1:
        raise SystemExit(f"--batches={args.batches}, --window={args.window}; allowed: ints >= 1")
    changes = {"run": {"device": args.device}, "reward": {"monitor": None}}
    try:
        if args.run is not None:
            directory, _, epoch = args.run.partition(":")
            run = load_run(directory, int(epoch) if epoch else None).build_run(changes)
        else:
            config = TrainConfig.from_tables(read_config_file(args.config), str(args.config))
            run = Run(config.with_changes(changes), reference=False)
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))
    config = run.config.env
    num_steps = config.num_inference_steps
    windows = [range(start, min(start + args.window, num_steps)) for start in range(0, num_steps, args.window)]
    # Each epoch is reduced at once to its per-step norms and per-window sums, so that only one
    # epoch's per-step gradients are held at a time.
    step_norms, window_gradients = [], []
    for _ in range(args.batches):
        gradients = gradients_by_step(run)
        step_norms.append([float(gradient.norm()) for gradient in gradients])
        window_gradients.append([sum(gradients[step] for step in window) for window in windows])
    norms = [sum(epoch[step] for epoch in step_norms) / args.batches for step in range(num_steps)]
    total = sum(norms)
    print(f"{config.num_envs * config.batches_per_epoch} samples an epoch, {args.batches} epoch(s), {run.config.reward.name}")
    print("| step | timestep | sigma_t | gradient norm | share |")
    print("|---:|---:|---:|---:|---:|")
    transition = run.policy.sampler
    for step, norm in enumerate(norms):
        print(
            f"| {step} | {int(transition.timesteps[step])} | {float(transition.sigma[step]):.4f} | "
            f"{norm:.3g} | {norm / total:.1%} |"
        )
    if args.batches < 2:
        return
    print("\n| steps | cosine between epochs' gradients: mean (each pair) |")
    print("|---|---|")
    for index, window in enumerate(windows):
        summed = [epoch[index] for epoch in window_gradients]
        cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(summed, 2)]
        pairs = ", ".join(f"{c:+.3f}" for c in cosines)
        print(f"| {window.start}-{window.stop - 1} | {sum(cosines) / len(cosines):+.3f} ({pairs}) |")


if __name__ == "__main__":
    main()
