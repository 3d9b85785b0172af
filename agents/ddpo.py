"""DDPO policy updates: the score-function (SF) and importance-sampled (IS) estimators.

Black et al., 2023, "Training Diffusion Models with Reinforcement Learning", Sec. 4.3 and Alg. 1.
One call of :func:`ddpo_update` trains on one batch of trajectories collected with
:func:`agents.rollouts.collect_trajectories`:

- ``"sf"``: eq. (3), one gradient step over the batch, accumulated over all its minibatches
  (on-policy: the ratio is 1, so the SF loss -A log p has the same gradient as the IS loss at
  the first step);
- ``"is"``: eq. (4) with PPO's clip, ``inner_epochs`` passes over the batch.

Log-likelihoods are recomputed for minibatches of (sample, timestep) pairs that mix timesteps,
so that each network call sees ``minibatch_size`` transitions whatever K is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from agents.losses import clipped_surrogate_loss, score_function_loss
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories


class NonFiniteError(FloatingPointError):
    """A loss or a parameter became NaN or inf: training stops instead of going on."""


@dataclass
class DDPOConfig:
    """Hyper-parameters of a DDPO update (defaults: DDPO's reference configuration where it has one).

    Attributes:
        estimator: ``"is"`` (clipped importance sampling) or ``"sf"`` (score function).
        clip_range: PPO clip epsilon of the IS ratio (1e-4 on the per-dimension ratio).
        per_dimension_ratio: clip the per-dimension-normalised ratio (True, DDPO's code) or the
            exact full-likelihood ratio (False).
        inner_epochs: passes over the batch (IS only; SF always makes one).
        minibatch_size: (sample, timestep) pairs per network call.
        gradient_accumulation: minibatches per optimiser step (IS; SF accumulates the whole batch).
        timestep_fraction: fraction of each trajectory's steps trained on, drawn at random.
        min_sigma: steps whose sigma_t is below this are not trained on. The gradient of
            log N(x; mu, sigma^2 I) with respect to mu is z / sigma_t, so the nearly deterministic
            last steps of a DDIM schedule (sigma_t ~ 0.01) dominate the gradient norm with noise
            (``benchmarks/gradient_by_step.py``: 78 % of it from the last 2 of 20 steps on the
            built-in model). 0 trains on every step, as DDPO does.
        max_sigma: steps whose sigma_t is above this are not trained on (default: none left out).
            With ``min_sigma`` it picks a window of the schedule: the first, noisiest steps lay
            out the scene (where shapes go, how many, the background), the later ones add the
            detail. On the built-in model, leaving out the first 4 of 20 steps kept the prompted
            background better under the JPEG-incompressibility reward (README).
        max_grad_norm: gradient-norm clip.
        kl_coefficient: weight of the exact KL to a reference policy (DPOK); 0 disables it.
    """

    estimator: Literal["is", "sf"] = "is"
    clip_range: float = 1e-4
    per_dimension_ratio: bool = True
    inner_epochs: int = 1
    minibatch_size: int = 32
    gradient_accumulation: int = 1
    timestep_fraction: float = 1.0
    min_sigma: float = 0.0
    max_sigma: float = math.inf
    max_grad_norm: float = 1.0
    kl_coefficient: float = 0.0

    def __post_init__(self) -> None:
        if self.estimator not in ("is", "sf"):
            raise ValueError(f"estimator={self.estimator!r}; allowed: 'is' or 'sf'")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction={self.timestep_fraction}; allowed: (0, 1]")
        if not self.min_sigma >= 0.0:
            raise ValueError(f"min_sigma={self.min_sigma}; allowed: >= 0")
        if not self.max_sigma >= self.min_sigma:
            raise ValueError(f"max_sigma={self.max_sigma} < min_sigma={self.min_sigma}; allowed: max_sigma >= min_sigma")
        for name in ("inner_epochs", "minibatch_size", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: an int >= 1")
        if self.kl_coefficient < 0:
            raise ValueError(f"kl_coefficient={self.kl_coefficient}; allowed: >= 0")


def ddpo_update(
    policy: GaussianDenoisingPolicy,
    trajectories: Trajectories,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: DDPOConfig,
    generator: torch.Generator,
    reference_policy: GaussianDenoisingPolicy | None = None,
) -> dict[str, float]:
    """Trains ``policy`` on one batch; returns the mean of each logged figure (``losses/...``).

    Raises:
        NonFiniteError: if a loss or gradient is NaN or inf (nothing is applied then).
        ValueError: if a KL coefficient is set without a reference policy.
    """
    if config.kl_coefficient > 0 and reference_policy is None:
        raise ValueError("kl_coefficient > 0 needs the reference (pretrained) policy")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    num_dims = math.prod(trajectories.latents.shape[2:])
    sigma = policy.sampler.sigma[: trajectories.num_steps].cpu()
    eligible = torch.nonzero((sigma >= config.min_sigma) & (sigma <= config.max_sigma)).flatten()
    if len(eligible) == 0:
        raise ValueError(
            f"min_sigma={config.min_sigma} and max_sigma={config.max_sigma} exclude every step (sigma_t "
            f"ranges over [{float(sigma.min()):.4g}, {float(sigma.max()):.4g}]); allowed: a window holding one of them"
        )
    num_train_steps = max(1, round(config.timestep_fraction * len(eligible)))
    inner_epochs = config.inner_epochs if config.estimator == "is" else 1
    figures: dict[str, list[float]] = {}
    policy.train()
    for _ in range(inner_epochs):
        steps = eligible[torch.randperm(len(eligible), generator=generator)[:num_train_steps]]
        minibatches = list(trajectories.minibatches(config.minibatch_size, generator, steps))
        # SF's gradient is only unbiased at the sampling policy: one optimiser step per batch.
        accumulation = len(minibatches) if config.estimator == "sf" else config.gradient_accumulation
        optimizer.zero_grad(set_to_none=True)
        for index, (samples, step_indices) in enumerate(minibatches, start=1):
            obs = trajectories.observations(samples, step_indices)
            actions = trajectories.actions(samples, step_indices)
            # The minibatch's step indices k index the transition's tables directly.
            mean = policy.mean(obs)
            log_probs = policy.sampler.log_prob(actions, mean, step_indices)
            sample_advantages = advantages[samples]
            if config.estimator == "sf":
                loss = score_function_loss(log_probs, sample_advantages)
                stats = {}
            else:
                loss, stats = clipped_surrogate_loss(
                    log_probs,
                    trajectories.log_probs[samples, step_indices],
                    sample_advantages,
                    config.clip_range,
                    num_dims if config.per_dimension_ratio else None,
                )
            if config.kl_coefficient > 0:
                with torch.no_grad():
                    reference_mean = reference_policy.mean(obs)
                kl = policy.sampler.kl_divergence(mean, reference_mean, step_indices).mean()
                loss = loss + config.kl_coefficient * kl
                stats["kl_to_reference"] = kl.detach()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteError(f"the DDPO loss is {loss_value}; stopping before the optimiser applies it")
            (loss / accumulation).backward()
            figures.setdefault("loss", []).append(loss_value)
            for key, value in stats.items():
                figures.setdefault(key, []).append(float(value))
            if index % accumulation == 0 or index == len(minibatches):
                # The total norm is NaN or inf as soon as one gradient entry is: one check covers all.
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise NonFiniteError(f"the gradient norm is {grad_norm}; stopping before the optimiser applies it")
                figures.setdefault("grad_norm", []).append(grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    policy.eval()
    return {f"losses/{key}": sum(values) / len(values) for key, values in figures.items()}
