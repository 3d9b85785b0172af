"""The DDPO family's objectives on per-step log-likelihoods (Black et al., 2023, Sec. 4).

All take log-likelihoods of (sample, step) pairs, so one call covers a minibatch that mixes
timesteps. Each returns the scalar to *minimise*.
"""

from __future__ import annotations

import torch

from diffusion_env.samplers.base import per_dimension


def score_function_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """DDPO_SF, eq. (3): grad J = E[ sum_t grad log p_theta(x_{t-1} | x_t, c) r ].

    Loss: -mean(A * log p_theta), whose gradient is the REINFORCE estimator with the advantage A
    in place of r (a baseline that leaves it unbiased).
    """
    return -(advantages * log_probs).mean()


def clipped_surrogate_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO_IS, eq. (4) with PPO's clip (Schulman et al., 2017, eq. 7), from the log ratio.

    ratio = p_theta(x_{t-1} | x_t, c) / p_theta_old(x_{t-1} | x_t, c) = exp(log_ratio)
    loss  = mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

    ``log_ratio`` is log p - log p_old (the exact full-likelihood ratio) or that difference
    divided by the latent's dimension D (:func:`diffusion_env.samplers.base.per_dimension`, the
    objective of DDPO's reference code, clip range 1e-4 there).

    Returns the loss and diagnostics: ``approx_kl`` (1/2 mean (log ratio)^2) and ``clip_fraction``.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        diagnostics = {
            "approx_kl": 0.5 * log_ratio.square().mean(),
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean(),
        }
    return loss, diagnostics


def importance_sampled_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    actions: torch.Tensor,
    clip_range: float,
    per_dimension_ratio: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`clipped_surrogate_loss` of the ratio p_theta / p_theta_old of the ``actions`` ``(B, ...)``.

    With ``per_dimension_ratio`` the log ratio is divided by the latent's dimension D first
    (:func:`~diffusion_env.samplers.base.per_dimension`, DDPO's reference code); else it is the
    exact one. DDPO-IS and GRPO share this objective.
    """
    log_ratio = log_probs - old_log_probs
    if per_dimension_ratio:
        log_ratio = per_dimension(log_ratio, actions)
    return clipped_surrogate_loss(log_ratio, advantages, clip_range)


def reward_weights(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """RWR (Peters & Schaal, 2007; Lee et al., 2023): w_i = exp(beta r_i) / sum_j exp(beta r_j), times B.

    Normalised to mean 1 over the batch, computed as a softmax so that large beta * r cannot overflow.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return torch.softmax(beta * rewards.to(torch.float32), dim=0) * rewards.shape[0]


def sparse_reward_weights(rewards: torch.Tensor, percentile: float) -> torch.Tensor:
    """Sparse RWR (DDPO Sec. 4.1): weight 1 for rewards at or above the batch's ``percentile``, else 0."""
    if not 0 <= percentile < 100:
        raise ValueError(f"percentile must be in [0, 100), got {percentile}")
    threshold = torch.quantile(rewards.to(torch.float32), percentile / 100.0)
    return (rewards >= threshold).to(torch.float32)


def weighted_denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """RWR's objective: the weighted denoising loss sum_i w_i ||prediction_i - target_i||^2 / (B D).

    The target is what the network predicts: the noise eps, v, or the clean sample.
    """
    per_sample = (prediction.float() - target.float()).square().flatten(1).mean(dim=1)
    return (weights * per_sample).mean()
