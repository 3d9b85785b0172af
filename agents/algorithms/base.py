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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from agents.distributed import Processes
from agents.policy import GaussianDenoisingPolicy, Observation
from agents.rollouts import Trajectories
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
        return policy.over_network(copy.deepcopy(policy.network).requires_grad_(False))
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
        epoch: the number of epochs trained before this update (0 for the first), for schedules
            over epochs such as a sliding window of trained steps.
        processes: the run's processes (:mod:`agents.distributed`): the backward pass, gradient
            clipping and any statistic the ranks must agree on go through them.
    """

    config: Any
    policy: GaussianDenoisingPolicy
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    max_grad_norm: float = 1.0
    reference: ReferencePolicy | None = None
    epoch: int = 0
    processes: Processes = field(default_factory=Processes)


def has_kl_penalty(config: Any) -> bool:
    """Whether an algorithm config with a ``kl_coefficient`` asks for a KL penalty, and so the reference policy."""
    return config.kl_coefficient > 0


def clipped_step(
    optimizer: torch.optim.Optimizer,
    parameters: list[torch.Tensor],
    max_grad_norm: float,
    processes: Processes | None = None,
) -> float:
    """Clips the gradient norm to ``max_grad_norm``, steps and zeroes the gradients; returns the norm before clipping.

    Raises:
        NonFiniteError: if the norm is NaN or inf (then nothing is applied).
    """
    # The total norm is NaN or inf as soon as one gradient entry is: one check covers all. After
    # the backward pass of a data-parallel run every rank holds the same averaged gradients, so
    # every rank decides alike.
    grad_norm = (processes or Processes()).clip_grad_norm(parameters, max_grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"the gradient norm is {grad_norm}; stopping before the optimiser applies it")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def mean_figures(figures: Mapping[str, list[float]]) -> dict[str, float]:
    """``losses/NAME``: the mean of each figure's values over the update's steps."""
    return {f"losses/{key}": sum(values) / len(values) for key, values in figures.items()}


#: ``objective(log_probs, samples, steps, actions) -> (loss, diagnostics)`` of one minibatch of
#: (sample, step) pairs: ``log_probs`` ``(M,)`` are the policy's, recomputed with gradients.
Objective = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


def policy_gradient_pass(
    policy: GaussianDenoisingPolicy,
    optimizer: torch.optim.Optimizer,
    trajectories: Trajectories,
    minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    objective: Objective,
    figures: dict[str, list[float]],
    *,
    name: str,
    accumulation: int = 1,
    max_grad_norm: float = 1.0,
    kl_coefficient: float = 0.0,
    reference: ReferencePolicy | None = None,
    target_kl: float = math.inf,
    processes: Processes | None = None,
) -> bool:
    """One pass of a policy-gradient update over ``minibatches`` of (sample, step) pairs.

    For each minibatch it recomputes the log-likelihoods of the recorded actions, takes
    ``objective``'s loss, adds ``kl_coefficient`` times the exact per-step KL to ``reference``
    (DPOK: Fan et al., 2023; Flow-GRPO's beta), and backpropagates; it steps the optimiser every
    ``accumulation`` minibatches and after the last. Each figure (``loss``, ``grad_norm``, the
    objective's diagnostics, ``kl_to_reference``) is appended to ``figures``.

    In a run of several ``processes`` every rank must take the same optimiser steps (the
    gradients are averaged in each backward pass): a rank with fewer minibatches than another
    repeats its last one with weight 0 (its gradient is 0; it is not logged), and the early stop
    reads the approx-KL of all ranks. The gradients of the minibatches before an optimiser step
    are accumulated on each rank (the wrapped module's ``no_sync``) and averaged once, in the
    step's last backward pass.

    Returns True if it stopped early: after an optimiser step whose minibatches' mean
    ``approx_kl`` (a diagnostic of the objective) exceeded ``target_kl``.

    Raises:
        ValueError: if ``kl_coefficient > 0`` without a reference policy, or no minibatch is given.
        NonFiniteError: if a loss or gradient is NaN or inf (``name`` says whose; nothing is applied then).
    """
    if kl_coefficient > 0 and reference is None:
        raise ValueError("kl_coefficient > 0 needs the reference (pretrained) policy")
    if not minibatches:
        raise ValueError(f"the {name} pass got no minibatch; allowed: at least one (sample, step) minibatch")
    processes = processes or Processes()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    total = processes.max(len(minibatches))
    # The summed approx-KL of the minibatches since the last optimiser step, and their count.
    step_kl = torch.zeros(2, dtype=torch.float64)
    for index in range(1, total + 1):
        own = index <= len(minibatches)
        steps_after = index % accumulation == 0 or index == total
        samples, steps = minibatches[min(index, len(minibatches)) - 1]
        obs = trajectories.observations(samples, steps)
        actions = trajectories.actions(samples, steps)
        with processes.synchronizing(policy.network, steps_after):
            # The minibatch's step indices k index the sampler's tables directly.
            mean = policy.mean(obs)
            loss, stats = objective(policy.sampler.log_prob(actions, mean, steps), samples, steps, actions)
            if kl_coefficient > 0:
                with torch.no_grad():
                    reference_mean = reference.mean(obs)
                kl = policy.sampler.kl_divergence(mean, reference_mean, steps).mean()
                loss = loss + kl_coefficient * kl
                stats["kl_to_reference"] = kl.detach()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteError(f"the {name} loss is {loss_value}; stopping before the optimiser applies it")
            processes.backward(loss * ((1.0 if own else 0.0) / accumulation))
        if own:
            figures.setdefault("loss", []).append(loss_value)
            for key, value in stats.items():
                figures.setdefault(key, []).append(float(value))
            if "approx_kl" in stats:
                step_kl += torch.tensor([float(stats["approx_kl"]), 1.0], dtype=torch.float64)
        if steps_after:
            figures.setdefault("grad_norm", []).append(clipped_step(optimizer, trainable, max_grad_norm, processes))
            if math.isfinite(target_kl):
                kl_sum, count = processes.sum(step_kl).tolist()
                if count > 0 and kl_sum / count > target_kl:
                    return True
            step_kl.zero_()
    return False
