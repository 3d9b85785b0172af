"""Reward-weighted regression on the denoising loss (DDPO paper, Sec. 4.1 "RWR" baselines).

RWR treats the final samples x_0 as data and fits the model to them by maximum likelihood,
weighted by their rewards: with the usual diffusion training loss as the likelihood surrogate,

    L(theta) = E_{x_0, t, eps} [ w(x_0) || eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t, c) ||^2 ],

with w = B softmax(beta r) (RWR) or w = 1[r >= percentile] (sparse RWR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from agents.ddpo import NonFiniteError
from agents.losses import reward_weights, sparse_reward_weights, weighted_denoising_loss
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories


@dataclass
class RWRConfig:
    """Hyper-parameters of an RWR update.

    Attributes:
        weighting: ``"exponential"`` (w proportional to exp(beta r)) or ``"sparse"`` (keep the top).
        beta: inverse temperature of the exponential weights.
        percentile: threshold of the sparse weights.
        minibatch_size: samples per network call.
        epochs: passes over the batch, each with fresh t and eps.
        max_grad_norm: gradient-norm clip.
    """

    weighting: Literal["exponential", "sparse"] = "exponential"
    beta: float = 1.0
    percentile: float = 90.0
    minibatch_size: int = 32
    epochs: int = 1
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.weighting not in ("exponential", "sparse"):
            raise ValueError(f"weighting={self.weighting!r}; allowed: 'exponential' or 'sparse'")


def rwr_update(
    policy: GaussianDenoisingPolicy,
    trajectories: Trajectories,
    optimizer: torch.optim.Optimizer,
    config: RWRConfig,
    generator: torch.Generator,
    scores: torch.Tensor | None = None,
) -> dict[str, float]:
    """Trains ``policy``'s network on the batch's final samples; returns ``losses/...`` means.

    ``scores`` ``(B,)`` are what the weights are computed from: the rewards by default; the
    training command passes the advantages (rewards normalised per prompt, as DDPO-IS uses them),
    which makes ``beta`` independent of the reward's scale and compares samples of one prompt
    rather than easy prompts with hard ones (as advantage-weighted regression does).

    Raises:
        NonFiniteError: if the loss is NaN or inf (nothing is applied then).
    """
    scores = trajectories.rewards if scores is None else scores
    if scores.shape != trajectories.rewards.shape:
        raise ValueError(f"scores have shape {tuple(scores.shape)}; allowed: one per sample, {tuple(trajectories.rewards.shape)}")
    weights = (
        reward_weights(scores, config.beta)
        if config.weighting == "exponential"
        else sparse_reward_weights(scores, config.percentile)
    )
    sampler = policy.sampler
    clean = trajectories.latents[:, -1]
    device = clean.device
    trainable = [p for p in policy.parameters() if p.requires_grad]
    losses: list[float] = []
    policy.train()
    for _ in range(config.epochs):
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
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError(f"the RWR loss is {loss.item()}; stopping before the optimiser applies it")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    policy.eval()
    return {"losses/rwr_loss": sum(losses) / len(losses), "losses/weight_max": float(weights.max())}
