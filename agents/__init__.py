"""Agents for the DiffusionDenoise environment: the Gaussian denoising policy and DDPO-family algorithms."""

from agents.advantages import PerPromptStatTracker, batch_normalized_advantages, clip_advantages
from agents.ddpo import DDPOConfig, NonFiniteError, ddpo_update
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories, collect_trajectories
from agents.rwr import RWRConfig, rwr_update

__all__ = [
    "DDPOConfig",
    "GaussianDenoisingPolicy",
    "NonFiniteError",
    "PerPromptStatTracker",
    "RWRConfig",
    "Trajectories",
    "batch_normalized_advantages",
    "clip_advantages",
    "collect_trajectories",
    "ddpo_update",
    "rwr_update",
]
