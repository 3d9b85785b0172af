"""What every algorithm's update receives: the policy, its optimiser, a generator and the reference policy.

An algorithm of :mod:`agents.algorithms` is one function

    update(context: UpdateContext, samples: Trajectories, advantages: Tensor) -> dict[str, float]

that trains ``context.policy`` on one epoch's trajectories and returns the means of its logged
figures (``losses/...``). The reference policy of a KL penalty (DPOK: Fan et al., 2023) is the
pretrained one: with LoRA adapters it is the same network with the adapters switched off (no
second copy of the model), and only full fine-tuning keeps a frozen copy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from agents.policy import GaussianDenoisingPolicy, Observation
from diffusion_env.backends import BackendModule


class NonFiniteError(FloatingPointError):
    """A loss or a parameter became NaN or inf: training stops instead of going on."""


class ReferencePolicy(Protocol):
    """The policy a KL penalty regularises towards; only its mean is read (under ``torch.no_grad``)."""

    def mean(self, observation: Observation) -> torch.Tensor:
        """mu_ref(x_t, t, c) ``(B, ...)``."""
        ...


class AdaptersDisabledReference:
    """The pretrained policy as the fine-tuned one with its LoRA adapters switched off.

    LoRA's B matrices start at zero, so at the start of training this is exactly the policy
    itself; it costs no memory beyond the adapters.
    """

    def __init__(self, policy: GaussianDenoisingPolicy) -> None:
        if not policy.has_lora:
            raise ValueError("the policy has no LoRA adapters; allowed: a policy after add_lora(rank)")
        self.policy = policy

    @torch.no_grad()
    def mean(self, observation: Observation) -> torch.Tensor:
        with self.policy.adapters_disabled():
            return self.policy.mean(observation)


def make_reference(policy: GaussianDenoisingPolicy) -> ReferencePolicy:
    """The pretrained policy of ``policy`` as it is now.

    With LoRA adapters: the same network with the adapters disabled. Without (full
    fine-tuning): a frozen copy of the network, taken now, before any update, over the same
    back-end's other parts (a ``BackendModule`` shares them; another back-end is copied whole).
    """
    if policy.has_lora:
        return AdaptersDisabledReference(policy)
    if isinstance(policy.backend, BackendModule):
        frozen = copy.deepcopy(policy.network).requires_grad_(False)
        return GaussianDenoisingPolicy(policy.backend.with_network(frozen), policy.sampler, policy.guidance_scale)
    return copy.deepcopy(policy).requires_grad_(False)


@dataclass
class UpdateContext:
    """What an update needs besides the samples and their advantages.

    Attributes:
        config: the algorithm's own config (an instance of its registered config class).
        policy: the policy trained.
        optimizer: the optimiser of the policy's trainable parameters.
        generator: the CPU generator of minibatch order, timesteps and noise of the update.
        max_grad_norm: gradient-norm clip of every optimiser step.
        reference: the pretrained policy, for a KL penalty (None when the algorithm's config asks
            for none).
    """

    config: Any
    policy: GaussianDenoisingPolicy
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    max_grad_norm: float = 1.0
    reference: ReferencePolicy | None = None


def clipped_step(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], max_grad_norm: float) -> float:
    """Clips the gradient norm to ``max_grad_norm``, steps and zeroes the gradients; returns the norm before clipping.

    Raises:
        NonFiniteError: if the norm is NaN or inf (then nothing is applied).
    """
    # The total norm is NaN or inf as soon as one gradient entry is: one check covers all.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm))
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"the gradient norm is {grad_norm}; stopping before the optimiser applies it")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mean_figures(figures: Mapping[str, list[float]]) -> dict[str, float]:
    """``losses/NAME``: the mean of each figure's values over the update's steps."""
    return {f"losses/{key}": sum(values) / len(values) for key, values in figures.items()}
