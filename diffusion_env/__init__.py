"""Diffusion sampling as a Gymnasium environment: ``gym.make("DiffusionDenoise-v0")``.

Layout (each folder imports only from those listed before it):

- :mod:`~diffusion_env.validation`, :mod:`~diffusion_env.images`: checks and helpers;
- :mod:`~diffusion_env.samplers`: per-step Gaussian policies of diffusion schedulers;
- :mod:`~diffusion_env.backends`: the models, and the registry that names them;
- :mod:`~diffusion_env.rewards`, :mod:`~diffusion_env.prompts`: what is scored, and on which prompts;
- :mod:`~diffusion_env.core`, :mod:`~diffusion_env.envs`: the batched MDP and its two Gymnasium views;
- :mod:`~diffusion_env.shapes`: the built-in world, registered on import.
"""

from gymnasium.envs.registration import register as _register_env

from diffusion_env.backends import (
    BackendModule,
    DenoiserBackend,
    PixelUNetDenoiser,
    available_models,
    make_denoiser,
    register_model,
)
from diffusion_env.core import CoreStepResult, DenoisingCore, EpisodeStateError
from diffusion_env.envs import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from diffusion_env.prompts import PromptSet, available_prompt_sets, make_prompt_set, register_prompt_set
from diffusion_env.rewards import Reward, RewardError, available_rewards, make_reward, register_reward
from diffusion_env.samplers import (
    GaussianSampler,
    GaussianTransition,
    Sampler,
    ScheduleError,
    available_samplers,
    make_sampler,
    register_sampler,
)
from diffusion_env import shapes  # noqa: E402,F401  (registers the built-in world)

__version__ = "0.1.0"

_register_env(
    id="DiffusionDenoise-v0",
    entry_point="diffusion_env.envs:DiffusionDenoiseEnv",
    vector_entry_point="diffusion_env.envs:DiffusionDenoiseVectorEnv",
)

__all__ = [
    "BackendModule",
    "CoreStepResult",
    "DenoiserBackend",
    "DenoisingCore",
    "DiffusionDenoiseEnv",
    "DiffusionDenoiseVectorEnv",
    "EpisodeStateError",
    "GaussianSampler",
    "GaussianTransition",
    "PixelUNetDenoiser",
    "PromptSet",
    "Reward",
    "RewardError",
    "Sampler",
    "ScheduleError",
    "available_models",
    "available_prompt_sets",
    "available_rewards",
    "available_samplers",
    "make_denoiser",
    "make_prompt_set",
    "make_reward",
    "make_sampler",
    "register_model",
    "register_prompt_set",
    "register_reward",
    "register_sampler",
]
