"""The Gaussian denoising policy: a diffusion model's sampler seen as a stochastic RL policy.

DDPO (Black et al., 2023, Sec. 4.2) observes that each step of a stochastic sampler is an
isotropic Gaussian policy over the next latent,

    pi_theta(a_t | s_t) = p_theta(x_{t-1} | x_t, c) = N(x_{t-1}; mu_theta(x_t, t, c), sigma_t^2 I),

whose log-likelihood is exact and cheap, so policy-gradient methods apply directly. The mean,
sigma and log-likelihood come from the environment's sampler (:mod:`diffusion_env.samplers`), the
same code the environment is built on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Independent, Normal

from diffusion_env.backends import BackendModule, DenoiserBackend
from diffusion_env.samplers import Sampler

Observation = Mapping[str, Any]

#: The timestep of a terminal observation, where no step remains.
TERMINAL_TIMESTEP = -1.0


class GaussianDenoisingPolicy(nn.Module):
    """pi_theta(x_{t-1} | x_t, t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I) over a denoiser back-end.

    Observations are the environment's dicts, batched ``(B, ...)`` or single (treated as a batch of
    one), as numpy arrays or torch tensors. ``mean``, ``distribution`` and ``log_prob`` are
    differentiable with respect to the back-end's network; classifier-free guidance is part of
    the mean.

    Terminal observations (timestep -1, which a ``NEXT_STEP`` vector environment returns when its
    episodes end) have no next latent: ``sample``, ``sample_with_log_prob`` and ``predict`` return
    the latent itself there (log-likelihood 0), which the environment ignores as it resets, so the
    loop ``obs, *_ = envs.step(policy.predict(obs))`` runs on forever.

    Args:
        backend: the denoiser (its network is this module's parameters).
        sampler: the sampler's per-step Gaussian policy (:class:`diffusion_env.samplers.Sampler`).
        guidance_scale: classifier-free guidance weight w.
        seed: seeds the policy's own generator, from which ``sample``/``predict`` draw their noise
            unless given another; None draws from torch's global generator.
    """

    def __init__(
        self, backend: DenoiserBackend, sampler: Sampler, guidance_scale: float, seed: int | None = None
    ) -> None:
        super().__init__()
        # Only the network is a submodule: parameters(), state_dict() and train()/eval() are the
        # trained network's, not the frozen VAE's or text encoders'; moves take the whole back-end.
        self.__dict__["backend"] = backend
        self.network = backend.trainable_module()
        self.sampler = sampler
        self.guidance_scale = float(guidance_scale)
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.seed(seed)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> GaussianDenoisingPolicy:
        if isinstance(self.backend, nn.Module):
            self.backend._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    @classmethod
    def from_env(cls, env: gym.Env | gym.vector.VectorEnv, seed: int | None = None) -> GaussianDenoisingPolicy:
        """The environment's own pretrained sampler (shares the environment's model).

        Reads the environment's public ``backend``, ``sampler`` and ``guidance_scale``.
        """
        env = env.unwrapped
        if not all(hasattr(env, name) for name in ("backend", "sampler", "guidance_scale")):
            raise TypeError(
                f"{type(env).__name__} is not a DiffusionDenoise environment; allowed: an env "
                "made with gym.make('DiffusionDenoise-v0') or gym.make_vec('DiffusionDenoise-v0')"
            )
        return cls(env.backend, env.sampler, env.guidance_scale, seed=seed)

    def over_network(self, network: nn.Module) -> GaussianDenoisingPolicy:
        """This policy (same sampler and guidance) over the same back-end whose network call runs
        ``network`` instead: e.g. the network wrapped for data-parallel training, which shares its
        parameters. Every other part of the back-end is shared (:meth:`BackendModule.with_network`).

        Raises:
            TypeError: if the back-end is not a :class:`~diffusion_env.backends.BackendModule`.
        """
        if not isinstance(self.backend, BackendModule):
            raise TypeError(
                f"the back-end {type(self.backend).__name__} is not a diffusion_env.backends.BackendModule, whose "
                "network can be swapped; allowed: a back-end built on BackendModule"
            )
        return type(self)(self.backend.with_network(network), self.sampler, self.guidance_scale)

    def seed(self, seed: int) -> None:
        """Re-seeds the policy's generator (on the back-end's device)."""
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    @property
    def device(self) -> torch.device:
        return self.backend.device

    # ------------------------------------------------------------------ LoRA and the reference policy

    def add_lora(
        self,
        rank: int,
        target_modules: tuple[str, ...] | None = None,
        seed: int = 0,
    ) -> dict[str, nn.Parameter]:
        """Freezes the network and adds LoRA adapters (Hu et al., 2021) through peft; returns them.

        As DDPO fine-tunes Stable Diffusion: rank-``rank`` updates of the attention projections,
        ``lora_alpha = rank`` (scale 1), B initialised to zero so that the policy starts exactly at
        the pretrained one; A is drawn from a generator seeded by ``seed``, so the same seed gives
        the same adapters. The adapters are kept in float32 whatever the network's dtype: the
        optimiser's small steps on half-precision adapters round away (a back-end whose network is
        in half precision runs it under autocast). Only the returned parameters require gradients
        afterwards. ``target_modules`` defaults to the back-end's ``lora_target_modules`` where it
        declares them (the transformers' joint-attention projections), else the UNet's attention
        projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.
        """
        from peft import LoraConfig

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r}; allowed: an int >= 1")
        if target_modules is None:
            target_modules = getattr(self.backend, "lora_target_modules", ("to_q", "to_k", "to_v", "to_out.0"))
        network = self.network
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(target_modules))
        existing = getattr(network, "peft_config", {}).get("default") if self.has_lora else None
        if existing is not None:
            # A second policy over the same back-end (e.g. a second environment): the adapters
            # the network carries are this policy's too.
            if existing.r != rank or set(existing.target_modules) != set(target_modules):
                raise ValueError(
                    f"the network already carries LoRA adapters of rank {existing.r} on {sorted(existing.target_modules)}; "
                    f"allowed: the same rank and target modules, or a back-end of its own"
                )
            return {name: p for name, p in network.named_parameters() if "lora_" in name}
        network.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network.add_adapter(config)
        adapters = {name: p for name, p in network.named_parameters() if p.requires_grad}
        for parameter in adapters.values():
            parameter.data = parameter.data.float()
        return adapters

    @property
    def has_lora(self) -> bool:
        """Whether the network carries peft adapters (:meth:`add_lora`)."""
        return bool(getattr(self.network, "_hf_peft_config_loaded", False))

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[GaussianDenoisingPolicy]:
        """Within the block, the policy is the pretrained one: the LoRA adapters are switched off.

        The reference policy of a KL penalty without a second copy of the model (peft's
        ``disable_adapters``); on exit the adapters are switched back on, also after an error.
        """
        if not self.has_lora:
            raise ValueError("the policy has no LoRA adapters to disable; add them with add_lora(rank)")
        self.network.disable_adapters()
        try:
            yield self
        finally:
            self.network.enable_adapters()

    # ------------------------------------------------------------------ observations

    def _inputs(
        self, observation: Observation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(latents, network timesteps, step indices, conditioning, terminal mask), batched on the device.

        Terminal rows get step index 0 and must not be evaluated; the mask says which they are.
        """
        keys = ("latent", "timestep", *self.backend.conditioning_shapes)
        missing = [key for key in keys if key not in observation]
        if missing:
            raise KeyError(f"observation lacks {missing}; allowed: a DiffusionDenoise observation with keys {list(keys)}")
        latent_shape = tuple(self.backend.latent_shape)
        latents = torch.as_tensor(observation["latent"], device=self.device)
        single = tuple(latents.shape) == latent_shape
        if single:
            latents = latents[None]
        elif latents.dim() != len(latent_shape) + 1 or tuple(latents.shape[1:]) != latent_shape:
            raise ValueError(
                f"observation['latent'] has shape {tuple(latents.shape)}; allowed: {latent_shape} or (B, *{latent_shape})"
            )
        batch = latents.shape[0]
        timesteps = torch.as_tensor(observation["timestep"], device=self.device).reshape(-1).to(torch.float32)
        if timesteps.numel() != batch:
            raise ValueError(f"observation['timestep'] holds {timesteps.numel()} values for {batch} latents; allowed: one each")
        conditioning = {}
        for key, shape in self.backend.conditioning_shapes.items():
            value = torch.as_tensor(observation[key], device=self.device)
            expected = tuple(shape) if single else (batch, *shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"observation[{key!r}] has shape {tuple(value.shape)}; allowed: {expected}, as the latent")
            conditioning[key] = value[None] if single else value
        terminal = timesteps == TERMINAL_TIMESTEP
        step_index = torch.zeros(batch, dtype=torch.long, device=self.device)
        if not bool(terminal.all()):
            step_index[~terminal] = self.sampler.step_index_of(timesteps[~terminal]).to(self.device)
        return latents.to(self.backend.dtype), self.sampler.timesteps[step_index], step_index, conditioning, terminal

    def _live_inputs(self, observation: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        latents, timesteps, step_index, conditioning, terminal = self._inputs(observation)
        if bool(terminal.any()):
            raise ValueError(
                "the observation is terminal (timestep -1): no step remains, so the policy has no "
                "distribution there; allowed: observations of steps 0 to K-1 (sample/predict accept terminal ones)"
            )
        return latents, timesteps, step_index, conditioning

    def _mean(
        self, latents: torch.Tensor, timesteps: torch.Tensor, step_index: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        model_output = self.backend.predict(latents, timesteps, conditioning, self.guidance_scale)
        return self.sampler.mean(latents, model_output, step_index)

    # ------------------------------------------------------------------ the policy

    def mean(self, observation: Observation) -> torch.Tensor:
        """mu_theta(x_t, t, c) ``(B, C, H, W)``: e.g. DDIM eq. (12) or DDPM eq. (7) without noise."""
        return self._mean(*self._live_inputs(observation))

    def std(self, observation: Observation) -> torch.Tensor:
        """sigma_t of each observation ``(B,)`` (0 at deterministic steps)."""
        return self.sampler.sigma[self._live_inputs(observation)[2]].to(torch.float32)

    def distribution(self, observation: Observation) -> Independent:
        """The policy's distribution over the next latent: a diagonal Gaussian with event shape (C, H, W)."""
        latents, timesteps, step_index, conditioning = self._live_inputs(observation)
        if not bool(self.sampler.stochastic[step_index].all()):
            raise ValueError("the observation is at a deterministic step (sigma = 0), which has no Gaussian distribution")
        mean = self._mean(latents, timesteps, step_index, conditioning)
        return Independent(Normal(mean, self.sampler.std(step_index, mean)), mean.dim() - 1)

    def log_prob(self, observation: Observation, action: Any) -> torch.Tensor:
        """Exact log pi_theta(action | observation), summed over the latent dimensions: ``(B,)``.

        0 at deterministic steps, which have no density (agents do not train on them).
        """
        latents, timesteps, step_index, conditioning = self._live_inputs(observation)
        action = torch.as_tensor(action, device=self.device)
        batch, num_dims = latents.shape[0], latents[0].numel()
        # The latent shape, or flattened per sample as SB3's buffers store Box actions.
        allowed = {tuple(latents.shape), (batch, num_dims)} | ({tuple(latents.shape[1:])} if batch == 1 else set())
        if tuple(action.shape) not in allowed:
            raise ValueError(
                f"action has shape {tuple(action.shape)}; allowed: {tuple(latents.shape)} (or ({batch}, {num_dims})), "
                "one next latent per observation"
            )
        mean = self._mean(latents, timesteps, step_index, conditioning)
        return self.sampler.log_prob(action.reshape(latents.shape), mean, step_index)

    def sample_with_log_prob(
        self,
        observation: Observation,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An action x_{t-1} = mu + sigma_t z and its exact log-likelihood ``(B,)``, from one network call.

        z ~ N(0, I) is drawn from ``generator`` (default: the policy's own, see ``seed``), or is
        the given ``noise``. Outside ``no_grad`` the action is reparameterised (differentiable
        through mu), so ``log_prob`` at it does not depend on mu: to train on log-likelihoods,
        detach the action (or sample under ``no_grad``, as the rollout collectors do).
        Terminal observations give the latent back, with log-likelihood 0.
        """
        latents, timesteps, step_index, conditioning, terminal = self._inputs(observation)
        generator = generator if generator is not None else self.generator
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        elif tuple(noise.shape) != tuple(latents.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}; allowed: {tuple(latents.shape)}")
        if bool(terminal.all()):
            return latents.clone(), torch.zeros(latents.shape[0], device=latents.device)
        live = ~terminal
        mean = self._mean(latents[live], timesteps[live], step_index[live], {k: v[live] for k, v in conditioning.items()})
        live_action = self.sampler.sample(mean, step_index[live], noise[live])
        live_log_prob = self.sampler.log_prob(live_action, mean, step_index[live])
        if bool(live.all()):
            return live_action, live_log_prob
        action = latents.to(live_action.dtype).clone()
        action[live] = live_action
        log_prob = torch.zeros(latents.shape[0], dtype=live_log_prob.dtype, device=latents.device)
        log_prob[live] = live_log_prob
        return action, log_prob

    def sample(
        self,
        observation: Observation,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{t-1} = mu + sigma_t z with z ~ N(0, I) from ``generator``, or the given ``noise``."""
        return self.sample_with_log_prob(observation, generator, noise)[0]

    @torch.no_grad()
    def predict(
        self, observation: Observation, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """A float32 numpy action for the environment, batched like ``observation`` (SB3's convention).

        ``deterministic=True`` returns the mean, which is *not* DDIM's deterministic sampler
        (that one uses sigma = 0 in the mean as well) but the mode of this policy. The noise comes
        from ``generator``, else the policy's own (seed it with ``seed`` or ``from_env(env, seed=)``).
        """
        batched = np.ndim(observation["latent"]) == len(self.backend.latent_shape) + 1
        if deterministic:
            shape = tuple(np.shape(observation["latent"]))
            zero = torch.zeros(shape if batched else (1, *shape), device=self.device, dtype=self.backend.dtype)
            action = self.sample(observation, noise=zero)
        else:
            action = self.sample(observation, generator)
        action = action.to(torch.float32).cpu().numpy()
        return action if batched else action[0]
