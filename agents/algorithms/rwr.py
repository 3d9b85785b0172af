"""Reward-weighted regression on the denoising loss (DDPO paper, Black et al., 2023, Sec. 4.1 "RWR").

RWR (Peters & Schaal, 2007; Lee et al., 2023) treats the final samples x_0 as data and fits the
model to them by maximum likelihood, weighted by their rewards: with the usual diffusion training
loss as the likelihood surrogate,

    L(theta) = E_{x_0, t, eps} [ w(x_0) || target - f_theta(noisy(x_0, eps, t), t, c) ||^2 ],

with w = B softmax(beta r) (RWR) or w = 1[r >= percentile] (sparse RWR). The timesteps, the noised
latents and the target (eps, v, velocity or x0) are the sampler's (``training_timesteps``,
``noisy_latents``, ``regression_target``). Registered as the algorithm ``"rwr"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from agents.algorithms.base import NonFiniteError, UpdateContext, clipped_step
from agents.algorithms.registry import register_algorithm
from agents.distributed import Processes
from agents.losses import reward_weights, sparse_reward_weights, weighted_denoising_loss
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories


@dataclass
class RWRConfig:
    """Hyper-parameters of an RWR update."""

    weighting: Literal["exponential", "sparse"] = field(
        default="exponential", metadata={"help": "exponential (w ~ exp(beta A)) or sparse (keep the top)", "flag": "rwr-weighting"}
    )
    beta: float = field(default=1.0, metadata={"help": "inverse temperature of the exponential weights (of the advantages)", "flag": "rwr-beta"})
    percentile: float = field(default=90.0, metadata={"help": "threshold percentile of the sparse weights (of the advantages)", "flag": "rwr-percentile"})
    minibatch_size: int = field(default=32, metadata={"help": "samples per network call"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each epoch's samples, each with fresh t and eps"})

    def __post_init__(self) -> None:
        if self.weighting not in ("exponential", "sparse"):
            raise ValueError(f"weighting={self.weighting!r}; allowed: 'exponential' or 'sparse'")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta}; allowed: > 0")
        if not 0 <= self.percentile < 100:
            raise ValueError(f"percentile={self.percentile}; allowed: [0, 100)")
        for name in ("minibatch_size", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: an int >= 1")


def rwr_update(
    policy: GaussianDenoisingPolicy,
    trajectories: Trajectories,
    optimizer: torch.optim.Optimizer,
    config: RWRConfig,
    generator: torch.Generator,
    scores: torch.Tensor | None = None,
    max_grad_norm: float = 1.0,
    processes: Processes | None = None,
) -> dict[str, float]:
    """Trains ``policy``'s network on the batch's final samples; returns ``losses/...`` means.

    ``scores`` ``(B,)`` are what the weights are computed from: the rewards by default; the
    training command passes the advantages (rewards normalised per prompt, as DDPO-IS uses them),
    which makes ``beta`` independent of the reward's scale and compares samples of one prompt
    rather than easy prompts with hard ones (as advantage-weighted regression does). With several
    ``processes`` (:mod:`agents.distributed`) the weights are those of all processes' samples together.

    Raises:
        NonFiniteError: if the loss or the gradient norm is NaN or inf (nothing is applied then).
    """
    scores = trajectories.rewards if scores is None else scores
    processes = processes or Processes()
    if scores.shape != trajectories.rewards.shape:
        raise ValueError(f"scores have shape {tuple(scores.shape)}; allowed: one per sample, {tuple(trajectories.rewards.shape)}")
    # The weights of the whole batch (all processes' samples), as one process would compute them.
    all_scores = processes.gather(scores)
    weights = processes.own_share(
        reward_weights(all_scores, config.beta)
        if config.weighting == "exponential"
        else sparse_reward_weights(all_scores, config.percentile)
    )
    sampler = policy.sampler
    clean = trajectories.latents[:, -1]
    device = clean.device
    trainable = [p for p in policy.parameters() if p.requires_grad]
    losses: list[float] = []
    grad_norms: list[float] = []
    policy.train()
    for _ in range(config.inner_epochs):
        order = torch.randperm(trajectories.batch_size, generator=generator).to(device)
        for start in range(0, len(order), config.minibatch_size):
            samples = order[start : start + config.minibatch_size]
            noise = torch.randn(clean[samples].shape, generator=generator).to(device, clean.dtype)
            timesteps = sampler.training_timesteps(len(samples), generator).to(device)
            noisy = sampler.noisy_latents(clean[samples], noise, timesteps)
            conditioning = {key: value[samples] for key, value in trajectories.conditioning.items()}
            predicted = policy.backend.predict(noisy, timesteps, conditioning, 1.0)
            # The regression target in the network's own parametrisation (eps, v, velocity or x0).
            target = sampler.regression_target(clean[samples], noise, timesteps)
            loss = weighted_denoising_loss(predicted, target, weights[samples])
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteError(f"the RWR loss is {loss_value}; stopping before the optimiser applies it")
            optimizer.zero_grad(set_to_none=True)
            processes.backward(loss)
            grad_norms.append(clipped_step(optimizer, trainable, max_grad_norm, processes))
            losses.append(loss_value)
    policy.eval()
    return {
        "losses/rwr_loss": sum(losses) / len(losses),
        "losses/weight_max": float(weights.max()),
        "losses/grad_norm": sum(grad_norms) / len(grad_norms),
    }


def update(context: UpdateContext, samples: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
    """The registered update: :func:`rwr_update` weighted by the advantages."""
    return rwr_update(
        context.policy, samples, context.optimizer, context.config, context.generator, advantages, context.max_grad_norm,
        context.processes,
    )


register_algorithm("rwr", RWRConfig, update, description="reward-weighted regression on the denoising loss (DDPO, Sec. 4.1)")
