"""Diffusion sampling as a Gymnasium environment: ``gym.make("DiffusionDenoise-v0")``."""

from gymnasium.envs.registration import register as _register_env

from diffusion_env.core import CoreStepResult, DenoisingCore, EpisodeStateError
from diffusion_env.envs import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from diffusion_env.models import DenoiserBackend, PixelUNetDenoiser, make_denoiser
from diffusion_env.prompts import PromptSet, make_prompt_set
from diffusion_env.rewards import Reward, RewardError, make_reward, register
from diffusion_env.transition import GaussianTransition, ScheduleError

__version__ = "0.1.0"

_register_env(
    id="DiffusionDenoise-v0",
    entry_point="diffusion_env.envs:DiffusionDenoiseEnv",
    vector_entry_point="diffusion_env.envs:DiffusionDenoiseVectorEnv",
)

__all__ = [
    "CoreStepResult",
    "DenoiserBackend",
    "DenoisingCore",
    "DiffusionDenoiseEnv",
    "DiffusionDenoiseVectorEnv",
    "EpisodeStateError",
    "GaussianTransition",
    "PixelUNetDenoiser",
    "PromptSet",
    "Reward",
    "RewardError",
    "ScheduleError",
    "make_denoiser",
    "make_prompt_set",
    "make_reward",
    "register",
]
