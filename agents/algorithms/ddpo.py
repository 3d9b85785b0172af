"""DDPO policy updates: the score-function (SF) and importance-sampled (IS) estimators.

Black et al., 2023, "Training Diffusion Models with Reinforcement Learning", Sec. 4.3 and Alg. 1.
One call of :func:`ddpo_update` trains on one batch of trajectories collected with
:func:`agents.rollouts.collect_trajectories`:

- ``"sf"``: eq. (3), one gradient step over the batch, accumulated over all its minibatches
  (on-policy: the ratio is 1, so the SF loss -A log p has the same gradient as the IS loss at
  the first step);
- ``"is"``: eq. (4) with PPO's clip (Schulman et al., 2017), ``inner_epochs`` passes over the batch.

Optionally the exact per-step KL to the pretrained policy is added (DPOK: Fan et al., 2023).
Log-likelihoods are recomputed for minibatches of (sample, timestep) pairs that mix timesteps,
so that each network call sees ``minibatch_size`` transitions whatever K is. The steps trained on
are those of :class:`agents.step_window.StepWindow` ``(min_sigma, max_sigma)``.

Registered as the algorithms ``"ddpo-is"`` and ``"ddpo-sf"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from agents.algorithms.base import (  # noqa: F401  (NonFiniteError: raised by the update)
    NonFiniteError,
    ReferencePolicy,
    UpdateContext,
    has_kl_penalty,
    mean_figures,
    policy_gradient_pass,
)
from agents.algorithms.registry import register_algorithm
from agents.distributed import Processes
from agents.losses import importance_sampled_loss, score_function_loss
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories
from agents.step_window import StepWindow


@dataclass
class DDPOConfig:
    """Hyper-parameters of a DDPO update (defaults: DDPO's reference configuration where it has one).

    ``min_sigma`` and ``max_sigma`` pick the steps trained on (:class:`agents.step_window.StepWindow`
    explains why: the nearly deterministic last steps dominate the gradient norm with noise, the
    first ones lay out the scene).
    """

    estimator: Literal["is", "sf"] = field(default="is", metadata={"help": "'is' (clipped importance sampling) or 'sf' (score function)"})
    clip_range: float = field(default=1e-4, metadata={"help": "DDPO-IS: PPO clip epsilon of the ratio"})
    per_dimension_ratio: bool = field(
        default=True, metadata={"help": "DDPO-IS: clip the per-dimension-normalised ratio (DDPO's code), else the exact one"}
    )
    inner_epochs: int = field(default=1, metadata={"help": "passes over each epoch's samples (DDPO-SF makes one)"})
    minibatch_size: int = field(default=32, metadata={"help": "(sample, timestep) pairs per network call"})
    gradient_accumulation: int = field(default=1, metadata={"help": "DDPO-IS: minibatches per optimiser step (SF: the whole batch)"})
    timestep_fraction: float = field(default=1.0, metadata={"help": "fraction of the trained steps drawn at random per pass"})
    min_sigma: float = field(default=0.0, metadata={"help": "steps with sigma_t below this are not trained on"})
    max_sigma: float = field(default=math.inf, metadata={"help": "steps with sigma_t above this are not trained on"})
    kl_coefficient: float = field(default=0.0, metadata={"help": "weight of the exact KL to the pretrained policy (DPOK); 0: none"})

    def __post_init__(self) -> None:
        if self.estimator not in ("is", "sf"):
            raise ValueError(f"estimator={self.estimator!r}; allowed: 'is' or 'sf'")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction={self.timestep_fraction}; allowed: (0, 1]")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range={self.clip_range}; allowed: > 0")
        StepWindow(self.min_sigma, self.max_sigma)  # refuses an empty or inverted window
        for name in ("inner_epochs", "minibatch_size", "gradient_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: an int >= 1")
        if not self.kl_coefficient >= 0:
            raise ValueError(f"kl_coefficient={self.kl_coefficient}; allowed: >= 0")

    @property
    def window(self) -> StepWindow:
        """The steps trained on."""
        return StepWindow(self.min_sigma, self.max_sigma)


def surrogate_loss(
    config: DDPOConfig,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    actions: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO-IS's clipped surrogate with ``config``'s clip range and ratio (per-dimension or exact)."""
    return importance_sampled_loss(
        log_probs, old_log_probs, advantages, actions, config.clip_range, config.per_dimension_ratio
    )


def ddpo_update(
    policy: GaussianDenoisingPolicy,
    trajectories: Trajectories,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    config: DDPOConfig,
    generator: torch.Generator,
    reference_policy: ReferencePolicy | None = None,
    max_grad_norm: float = 1.0,
    processes: Processes | None = None,
) -> dict[str, float]:
    """Trains ``policy`` on one batch; returns the mean of each logged figure (``losses/...``).

    ``reference_policy`` is the pretrained policy of the KL penalty (:func:`agents.algorithms.make_reference`);
    ``processes`` the run's processes (:mod:`agents.distributed`; one by default).

    Raises:
        NonFiniteError: if a loss or gradient is NaN or inf (nothing is applied then).
        ValueError: if a KL coefficient is set without a reference policy, or the step window
            holds no step.
    """

    def objective(
        log_probs: torch.Tensor, samples: torch.Tensor, steps: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if config.estimator == "sf":
            return score_function_loss(log_probs, advantages[samples]), {}
        return surrogate_loss(config, log_probs, trajectories.log_probs[samples, steps], advantages[samples], actions)

    eligible = trajectories.trained_steps(config.window, policy.sampler)
    num_train_steps = max(1, round(config.timestep_fraction * len(eligible)))
    inner_epochs = config.inner_epochs if config.estimator == "is" else 1
    figures: dict[str, list[float]] = {}
    policy.train()
    for _ in range(inner_epochs):
        steps = eligible[torch.randperm(len(eligible), generator=generator)[:num_train_steps]]
        minibatches = list(trajectories.minibatches(config.minibatch_size, generator, steps))
        # SF's gradient is only unbiased at the sampling policy: one optimiser step per batch.
        accumulation = len(minibatches) if config.estimator == "sf" else config.gradient_accumulation
        policy_gradient_pass(
            policy, optimizer, trajectories, minibatches, objective, figures, name="DDPO", accumulation=accumulation,
            max_grad_norm=max_grad_norm, kl_coefficient=config.kl_coefficient, reference=reference_policy,
            processes=processes,
        )
    policy.eval()
    return mean_figures(figures)


def update(context: UpdateContext, samples: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
    """The registered update: :func:`ddpo_update` with the context's policy, optimiser and reference."""
    return ddpo_update(
        context.policy,
        samples,
        advantages,
        context.optimizer,
        context.config,
        context.generator,
        context.reference,
        context.max_grad_norm,
        context.processes,
    )


register_algorithm(
    "ddpo-is", DDPOConfig, update, fixed={"estimator": "is"}, uses_reference=has_kl_penalty,
    description="DDPO with importance sampling and PPO's clip (Black et al., 2023, eq. 4)",
)
register_algorithm(
    "ddpo-sf", DDPOConfig, update, fixed={"estimator": "sf"}, uses_reference=has_kl_penalty,
    description="DDPO's score-function estimator, one step per epoch (Black et al., 2023, eq. 3)",
)
