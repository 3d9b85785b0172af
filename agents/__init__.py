"""Agents for the DiffusionDenoise environment: the Gaussian denoising policy and DDPO-family algorithms."""

from agents.policy import GaussianDenoisingPolicy

__all__ = ["GaussianDenoisingPolicy"]
