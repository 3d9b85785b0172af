"""Samplers: the per-step Gaussian policies of diffusion schedulers, found by name or by scheduler type.

:func:`make_sampler` builds the sampler of a back-end's scheduler: a registered name picks one
explicitly; otherwise the scheduler's type does (``DDIMScheduler`` and ``DDPMScheduler`` give
:class:`GaussianTransition`, ``FlowMatchEulerDiscreteScheduler`` the flow SDE of
:class:`FlowSampler`). A new sampler is one module that subclasses
:class:`~diffusion_env.samplers.base.GaussianSampler` and one call of :func:`register_sampler`
(by name) or :func:`register_scheduler_sampler` (as the default of a scheduler type).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion_env.samplers.base import GaussianSampler, Sampler, ScheduleError
from diffusion_env.registry import Registry
from diffusion_env.samplers.ddim_ddpm import GaussianTransition
from diffusion_env.samplers.flow import FlowSampler

#: ``factory(scheduler, num_inference_steps, device=..., **options) -> Sampler``.
SamplerFactory = Callable[..., Sampler]

SAMPLERS: Registry[SamplerFactory] = Registry("sampler", {"ddim_ddpm": GaussianTransition, "flow": FlowSampler})
#: Scheduler class name -> the default sampler of back-ends with that scheduler.
SCHEDULER_SAMPLERS: Registry[SamplerFactory] = Registry(
    "scheduler's sampler",
    {"DDIMScheduler": GaussianTransition, "DDPMScheduler": GaussianTransition, "FlowMatchEulerDiscreteScheduler": FlowSampler},
)


def register_sampler(name: str, factory: SamplerFactory, overwrite: bool = False) -> None:
    """Makes ``factory`` available as ``sampler=name`` (e.g. ``gym.make(..., sampler=name)``)."""
    SAMPLERS.register(name, factory, overwrite)


def register_scheduler_sampler(scheduler_class: str, factory: SamplerFactory, overwrite: bool = False) -> None:
    """Makes ``factory`` the default sampler of back-ends whose scheduler is of the class named
    ``scheduler_class`` (or a subclass of it), e.g. ``"FlowMatchEulerDiscreteScheduler"``."""
    SCHEDULER_SAMPLERS.register(scheduler_class, factory, overwrite)


def available_samplers() -> list[str]:
    """The registered sampler names."""
    return SAMPLERS.names()


def make_sampler(
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    sampler: str | SamplerFactory | None = None,
    device: torch.device | str = "cpu",
    **options: Any,
) -> Sampler:
    """The sampler of ``scheduler`` with K = ``num_inference_steps`` steps.

    Args:
        scheduler: the back-end's diffusers scheduler (only its configuration is read).
        num_inference_steps: K.
        sampler: a registered name, a factory, or None for the default of the scheduler's type.
        device: where the per-step tables live.
        options: the sampler's own options (e.g. ``eta`` for DDIM).

    Raises:
        ValueError: for an unknown name; ScheduleError: for a scheduler with no sampler.
    """
    if sampler is None:
        factory = SCHEDULER_SAMPLERS.for_instance(scheduler)
        if factory is None:
            raise ScheduleError(
                f"scheduler {type(scheduler).__name__} has no registered sampler; allowed: a scheduler of "
                f"{SCHEDULER_SAMPLERS.names()}, or sampler= one of {available_samplers()} or a factory"
            )
    elif isinstance(sampler, str):
        factory = SAMPLERS.get(sampler, " or a factory")
    elif callable(sampler):
        factory = sampler
    else:
        raise TypeError(f"sampler must be a name, a factory or None, got {type(sampler).__name__}")
    built = factory(scheduler, num_inference_steps, device=device, **options)
    if not isinstance(built, Sampler):
        raise TypeError(f"the sampler factory returned {type(built).__name__}, which does not implement Sampler")
    return built


__all__ = [
    "SAMPLERS",
    "FlowSampler",
    "GaussianSampler",
    "GaussianTransition",
    "Sampler",
    "SamplerFactory",
    "ScheduleError",
    "available_samplers",
    "make_sampler",
    "register_sampler",
    "register_scheduler_sampler",
]
