"""The Gaussian denoising policy: a diffusion model's sampler seen as a stochastic RL policy.

DDPO (Black et al., 2023, Sec. 4.2) observes that each step of a stochastic sampler is an
isotropic Gaussian policy over the next latent,

    pi_theta(a_t | s_t) = p_theta(x_{t-1} | x_t, c) = N(x_{t-1}; mu_theta(x_t, t, c), sigma_t^2 I),

whose log-likelihood is exact and cheap, so policy-gradient methods apply directly. The mean,
sigma and log-likelihood come from :class:`diffusion_env.transition.GaussianTransition`, the same
code the environment is built on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Independent, Normal

from diffusion_env.core import DenoisingCore
from diffusion_env.models import DenoiserBackend
from diffusion_env.transition import GaussianTransition

Observation = Mapping[str, Any]


def _core_of(env: gym.Env | gym.vector.VectorEnv) -> DenoisingCore:
    core = getattr(env.unwrapped, "core", None)
    if not isinstance(core, DenoisingCore):
        raise TypeError(
            f"{type(env.unwrapped).__name__} is not a DiffusionDenoise environment; allowed: an env "
            "made with gym.make('DiffusionDenoise-v0') or gym.make_vec('DiffusionDenoise-v0')"
        )
    return core


class GaussianDenoisingPolicy(nn.Module):
    """pi_theta(x_{t-1} | x_t, t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I) over a denoiser back-end.

    Observations are the environment's dicts, batched ``(B, ...)`` or single (treated as a batch of
    one), as numpy arrays or torch tensors. ``mean``, ``distribution`` and ``log_prob`` are
    differentiable with respect to the back-end's network; classifier-free guidance is part of
    the mean.

    Args:
        backend: the denoiser (its network is this module's parameters).
        transition: the sampler's Gaussian transition.
        guidance_scale: classifier-free guidance weight w.
    """

    def __init__(self, backend: DenoiserBackend, transition: GaussianTransition, guidance_scale: float) -> None:
        super().__init__()
        self.backend = backend
        self.transition = transition
        self.guidance_scale = float(guidance_scale)

    @classmethod
    def from_env(cls, env: gym.Env | gym.vector.VectorEnv) -> GaussianDenoisingPolicy:
        """The environment's own pretrained sampler (shares the environment's model)."""
        core = _core_of(env)
        return cls(core.backend, core.transition, core.guidance_scale)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def add_lora(self, rank: int, target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> dict[str, nn.Parameter]:
        """Freezes the network and adds LoRA adapters (Hu et al., 2021) through peft; returns them.

        As DDPO fine-tunes Stable Diffusion: rank-``rank`` updates of the attention projections,
        ``lora_alpha = rank`` (scale 1), B initialised to zero so that the policy starts exactly at
        the pretrained one. Only the returned parameters require gradients afterwards.
        """
        from peft import LoraConfig

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r}; allowed: an int >= 1")
        network = self.backend.trainable_module()
        network.requires_grad_(False)
        network.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(target_modules))
        )
        return {name: p for name, p in network.named_parameters() if p.requires_grad}

    def _inputs(self, observation: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, timesteps, step indices, prompt embeddings) as batched tensors on the device."""
        missing = {"latent", "timestep", "prompt_embedding"} - set(observation)
        if missing:
            raise KeyError(f"observation lacks {sorted(missing)}; allowed: the DiffusionDenoise observation dict")
        latents = torch.as_tensor(observation["latent"], device=self.device)
        timesteps = torch.as_tensor(observation["timestep"], device=self.device)
        prompt_embeds = torch.as_tensor(observation["prompt_embedding"], device=self.device)
        if latents.dim() == 3:
            latents, timesteps, prompt_embeds = latents[None], timesteps[None], prompt_embeds[None]
        timesteps = timesteps.reshape(-1).round().to(torch.long)
        step_index = self.transition.step_index_of(timesteps)
        return latents.to(self.backend.dtype), timesteps, step_index, prompt_embeds

    def _mean(self, latents: torch.Tensor, timesteps: torch.Tensor, step_index: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        model_output = self.backend.predict(latents, timesteps, prompt_embeds, self.guidance_scale)
        return self.transition.mean(latents, model_output, step_index)

    def mean(self, observation: Observation) -> torch.Tensor:
        """mu_theta(x_t, t, c) ``(B, C, H, W)``: DDIM eq. (12) or DDPM eq. (7) without noise."""
        return self._mean(*self._inputs(observation))

    def std(self, observation: Observation) -> torch.Tensor:
        """sigma_t of each observation ``(B,)``."""
        return self.transition.sigma[self._inputs(observation)[2]].to(torch.float32)

    def distribution(self, observation: Observation) -> Independent:
        """The policy's distribution over the next latent: a diagonal Gaussian with event shape (C, H, W)."""
        latents, timesteps, step_index, prompt_embeds = self._inputs(observation)
        mean = self._mean(latents, timesteps, step_index, prompt_embeds)
        return Independent(Normal(mean, self.transition.std(step_index, mean)), 3)

    def log_prob(self, observation: Observation, action: Any) -> torch.Tensor:
        """Exact log pi_theta(action | observation), summed over the latent dimensions: ``(B,)``."""
        latents, timesteps, step_index, prompt_embeds = self._inputs(observation)
        action = torch.as_tensor(action, device=self.device).reshape(latents.shape)
        mean = self._mean(latents, timesteps, step_index, prompt_embeds)
        return self.transition.log_prob(action, mean, step_index)

    def sample_with_log_prob(
        self,
        observation: Observation,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An action x_{t-1} = mu + sigma_t z and its exact log-likelihood ``(B,)``, from one network call.

        z ~ N(0, I) is drawn from ``generator``, or is the given ``noise``. Outside ``no_grad`` the
        action is reparameterised (differentiable through mu), so ``log_prob`` at it does not
        depend on mu: to train on log-likelihoods, detach the action (or sample under ``no_grad``,
        as the rollout collectors do).
        """
        latents, timesteps, step_index, prompt_embeds = self._inputs(observation)
        mean = self._mean(latents, timesteps, step_index, prompt_embeds)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        action = mean + self.transition.std(step_index, mean) * noise.to(mean.device, mean.dtype)
        return action, self.transition.log_prob(action, mean, step_index)

    def sample(
        self,
        observation: Observation,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{t-1} = mu + sigma_t z with z ~ N(0, I) from ``generator``, or the given ``noise``."""
        return self.sample_with_log_prob(observation, generator, noise)[0]

    @torch.no_grad()
    def predict(self, observation: Observation, deterministic: bool = False) -> np.ndarray:
        """A float32 numpy action for the environment, batched like ``observation`` (SB3's convention).

        ``deterministic=True`` returns the mean, which is *not* DDIM's deterministic sampler
        (that one uses sigma = 0 in the mean as well) but the mode of this policy.
        """
        batched = observation["latent"].ndim == 4
        action = self.mean(observation) if deterministic else self.sample(observation)
        action = action.to(torch.float32).cpu().numpy()
        return action if batched else action[0]
