"""Agents for the DiffusionDenoise environment: the Gaussian denoising policy and DDPO-family algorithms."""

from agents.advantages import PerPromptStatTracker, batch_normalized_advantages, clip_advantages
from agents.algorithms import (
    NonFiniteError,
    UpdateContext,
    available_algorithms,
    get_algorithm,
    make_reference,
    register_algorithm,
)
from agents.algorithms.ddpo import DDPOConfig, ddpo_update
from agents.algorithms.grpo import GRPOConfig
from agents.algorithms.rwr import RWRConfig, rwr_update
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories, collect_trajectories
from agents.step_window import StepWindow

__all__ = [
    "DDPOConfig",
    "GRPOConfig",
    "GaussianDenoisingPolicy",
    "NonFiniteError",
    "PerPromptStatTracker",
    "RWRConfig",
    "StepWindow",
    "Trajectories",
    "UpdateContext",
    "available_algorithms",
    "batch_normalized_advantages",
    "clip_advantages",
    "collect_trajectories",
    "ddpo_update",
    "get_algorithm",
    "make_reference",
    "register_algorithm",
    "rwr_update",
]
