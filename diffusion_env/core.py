"""The batched denoising MDP: one implementation that the single and the vector environment view.

State: latents x_t ``(N, C, H, W)``, the step index k (shared: every episode of a batch has the
same length, so all N environments are always at the same step), the prompts, their metadata and
their conditioning (the entries the back-end declares). Transition: deterministic, x_{t-1} is the action. Reward: 0 on every step but
the last, where the final latents are decoded and the reward function is called once for the
whole batch. Everything stays in torch on the core's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from diffusion_env.backends import DenoiserBackend, make_denoiser
from diffusion_env.backends.base import backend_sampler
from diffusion_env.prompts import PromptSet, make_prompt_set
from diffusion_env.rewards import Reward, RewardFn, make_reward
from diffusion_env.samplers import Sampler, SamplerFactory
from diffusion_env.validation import check_device, check_float, check_int


_FLOAT32_MAX = float(np.finfo(np.float32).max)

#: The environment's defaults: the built-in model, DDPO's first task, the scene training prompts.
DEFAULT_MODEL = "shapes32"
DEFAULT_REWARD = "jpeg_compressibility"
DEFAULT_PROMPTS = "scenes_train"


class EpisodeStateError(RuntimeError):
    """``step`` was called before ``reset`` or after the episode ended."""


@dataclass(frozen=True)
class CoreStepResult:
    """What one batched transition produced.

    Attributes:
        rewards: ``(N,)`` float32 on the core's device (zeros before the last step).
        terminated: whether this step was the last denoising step.
        images: on the last step, the decoded final images ``(N, H, W, 3)`` uint8; else None.
        reward_details: on the last step, the reward's per-sample details; else empty.
    """

    rewards: torch.Tensor
    terminated: bool
    images: torch.Tensor | None = None
    reward_details: dict[str, np.ndarray] = field(default_factory=dict)


class DenoisingCore:
    """The batched denoising MDP over ``num_envs`` episodes in lockstep.

    Args:
        num_envs: batch size N.
        model: a registered model name, a hub id or pipeline folder, a diffusers pipeline, or a
            :class:`~diffusion_env.backends.DenoiserBackend` (see :func:`~diffusion_env.backends.make_denoiser`).
        reward: a registered reward name or a callable ``(images, prompts, metadata) -> rewards``.
        prompts: a registered prompt-set name, a list of prompts or a ``PromptSet``.
        num_inference_steps: denoising steps K per episode.
        eta: DDIM's eta in (0, 1]; DDPM schedulers require 1.0; None leaves the sampler's default.
        sampler: a registered sampler name, a factory ``(scheduler, K, device=..., **options) ->
            Sampler``, or None for the default sampler of the back-end's scheduler type.
        sampler_options: further keyword options of the sampler (they take precedence over the
            options the back-end's schedule asks for, such as FLUX's ``mu``).
        height, width: the image size, for models whose resolution can be chosen (Stable
            Diffusion; default: the model's native size).
        negative_prompt: the prompt of classifier-free guidance's unconditional branch, for
            models that take one (default: the empty prompt).
        model_options: further options of the model's construction (e.g. ``frozen_dtype``).
        guidance_scale: classifier-free guidance weight (>= 0) used for the rendered x0-prediction
            and by policies built from the environment; None takes the model's default.
        device: where the model and the state live (default: the model's device).
        dtype: the model's and the latents' dtype (default: the model's dtype).
        latent_bound: actions and observed latents lie in [-latent_bound, latent_bound].
        samples_per_prompt: each reset draws N / samples_per_prompt prompts and gives each one to
            that many consecutive episodes (with their own noise), so that rewards can be compared
            among samples of the same prompt (DDPO's per-prompt statistics, GRPO-style groups).
    """

    def __init__(
        self,
        num_envs: int = 1,
        *,
        model: str | DenoiserBackend = DEFAULT_MODEL,
        reward: str | RewardFn | Reward = DEFAULT_REWARD,
        prompts: str | list[str] | PromptSet = DEFAULT_PROMPTS,
        num_inference_steps: int = 20,
        eta: float | None = None,
        guidance_scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        latent_bound: float = 100.0,
        samples_per_prompt: int = 1,
        sampler: str | SamplerFactory | None = None,
        sampler_options: Mapping[str, Any] | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        model_options: Mapping[str, Any] | None = None,
    ) -> None:
        # Cheap checks first, so that a bad argument fails before a model is built.
        num_envs = check_int("num_envs", num_envs, 1)
        samples_per_prompt = check_int("samples_per_prompt", samples_per_prompt)
        if samples_per_prompt < 1 or num_envs % samples_per_prompt:
            raise ValueError(
                f"samples_per_prompt={samples_per_prompt} with num_envs={num_envs}; allowed: a positive "
                "int that divides num_envs"
            )
        latent_bound = check_float("latent_bound", latent_bound, 0.0, exclusive_minimum=True)
        if guidance_scale is not None:
            guidance_scale = check_float("guidance_scale", guidance_scale, 0.0)
        if device is not None:
            device = check_device(device)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
        options = dict(sampler_options or {})
        if eta is not None:
            options["eta"] = eta
        self.reward = make_reward(reward)
        self.prompt_set = make_prompt_set(prompts)
        given = {"height": height, "width": width, "negative_prompt": negative_prompt}
        build_options = {**(model_options or {}), **{key: value for key, value in given.items() if value is not None}}
        self.backend = make_denoiser(model, device=device, dtype=dtype, **build_options)
        self.sampler: Sampler = backend_sampler(self.backend, num_inference_steps, sampler, **options)
        self.guidance_scale = self.backend.default_guidance_scale if guidance_scale is None else guidance_scale
        self.num_envs = num_envs
        self.samples_per_prompt = samples_per_prompt
        self.latent_bound = latent_bound
        self.num_steps = num_inference_steps
        self.generator = torch.Generator(device=self.device)

        self.step_index = -1  # -1: not reset yet; num_steps: episode over
        self.latents: torch.Tensor | None = None
        self.prompts: list[str] = []
        self.metadata: list[dict[str, Any]] = []
        self.conditioning: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- description

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.backend.latent_shape)

    def single_observation_space(self) -> spaces.Dict:
        """The observation space of one environment (float32 numpy arrays): the latent, the
        timestep, and the conditioning entries the back-end declares."""
        entries = {
            "latent": spaces.Box(-self.latent_bound, self.latent_bound, self.latent_shape, np.float32),
            "timestep": spaces.Box(-1.0, float(self.sampler.max_timestep), (1,), np.float32),
        }
        for key, shape in self.backend.conditioning_shapes.items():
            if key in entries:
                raise ValueError(f"the back-end declares a conditioning entry {key!r}, a name the observation already uses")
            # Any finite float32: encoder states have no natural bound, and infinite bounds
            # would make the space claim to hold inf.
            entries[key] = spaces.Box(-_FLOAT32_MAX, _FLOAT32_MAX, tuple(shape), np.float32)
        return spaces.Dict(entries)

    def single_action_space(self) -> spaces.Box:
        """The action space of one environment: the next latent, in finite bounds."""
        return spaces.Box(-self.latent_bound, self.latent_bound, self.latent_shape, np.float32)

    # ---------------------------------------------------------------- state

    @property
    def episode_over(self) -> bool:
        return self.step_index == self.num_steps

    def timesteps(self) -> torch.Tensor:
        """Timestep of the current latents ``(N,)`` float32 (never rounded); -1 once the episode is over."""
        if self.episode_over:
            return torch.full((self.num_envs,), -1.0, dtype=torch.float32, device=self.device)
        return self.sampler.timesteps[self.step_index].to(torch.float32).expand(self.num_envs)

    def step_indices(self) -> torch.Tensor:
        """The step index k of every episode ``(N,)`` long, as the sampler's tables are indexed."""
        return torch.full((self.num_envs,), self.step_index, dtype=torch.long, device=self.device)

    def observation(self) -> dict[str, torch.Tensor]:
        """The current observation as new tensors on the device (latents in the core's dtype):
        changing them does not change the environment's state."""
        self.require_reset()
        return {
            "latent": self.latents.clone(),
            "timestep": self.timesteps()[:, None].clone(),
            **{key: value.clone() for key, value in self.conditioning.items()},
        }

    def reset(self, rng: np.random.Generator, shared_noise: bool = False) -> None:
        """Starts N new episodes: prompts drawn from ``rng``, x_T ~ N(0, I) from a generator seeded by it.

        With ``shared_noise`` the ``samples_per_prompt`` episodes of each prompt start from one
        x_T (DanceGRPO's shared initial noise, Xue et al., 2025), drawn per group, so that
        different groups start from different noise.
        """
        drawn, drawn_metadata = self.prompt_set.sample(self.num_envs // self.samples_per_prompt, rng)
        prompts = [prompt for prompt in drawn for _ in range(self.samples_per_prompt)]
        metadata = [dict(meta) for meta in drawn_metadata for _ in range(self.samples_per_prompt)]
        # Each drawn prompt is encoded once and its conditioning repeated for its samples: the text
        # encoders of the large models cost as much per prompt as a network call.
        conditioning = dict(self.backend.encode_prompts(drawn))
        if set(conditioning) != set(self.backend.conditioning_shapes):
            raise ValueError(
                f"the back-end's encode_prompts returned entries {sorted(conditioning)}; it declares "
                f"{sorted(self.backend.conditioning_shapes)}"
            )
        conditioning = {key: value.repeat_interleave(self.samples_per_prompt, dim=0) for key, value in conditioning.items()}
        self.generator.manual_seed(int(rng.integers(2**63)))
        # Sampling starts from pure noise scaled by the sampler's init_noise_sigma (1 for DDIM/DDPM).
        count = self.num_envs // self.samples_per_prompt if shared_noise else self.num_envs
        latents = torch.randn(
            (count, *self.latent_shape), generator=self.generator, device=self.device, dtype=self.dtype
        ) * self.sampler.init_noise_sigma
        if shared_noise:
            latents = latents.repeat_interleave(self.samples_per_prompt, dim=0)
        self.prompts, self.metadata, self.conditioning, self.latents = prompts, metadata, conditioning, latents
        self.step_index = 0

    def branch(self, latents: torch.Tensor, step_index: int) -> None:
        """Restarts the current episodes (same prompts and conditioning) from ``latents`` ``(N, C, H, W)``
        at step index ``step_index``: the next step goes from these latents at that step's timestep.

        A group of episodes given the same latents shares its trajectory up to ``step_index`` and
        may differ after it (branching: TempFlow-GRPO, He et al., 2025; BranchGRPO, Li et al., 2025).

        Raises:
            EpisodeStateError: before the first ``reset``.
            TypeError, ValueError: for latents that are no valid action (:meth:`check_action`), or a
                step index outside ``[0, K)``.
        """
        self.require_reset()
        step_index = check_int("step_index", step_index, 0, self.num_steps - 1)
        self.latents = self.check_action(latents, "latents")
        self.step_index = step_index

    def require_reset(self) -> None:
        if self.step_index < 0:
            raise EpisodeStateError("the environment has not been reset; call reset() before step() or render()")

    def check_action(self, action: torch.Tensor, name: str = "action") -> torch.Tensor:
        """Validates a batched action ``(N, C, H, W)`` (or other latents, called ``name`` in errors);
        returns a private copy in the core's dtype.

        Raises:
            TypeError: for a non-floating dtype.
            ValueError: for a wrong shape, a wrong device, NaN/inf or values out of bounds.
        """
        expected = (self.num_envs, *self.latent_shape)
        if not isinstance(action, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor here, got {type(action).__name__}")
        if action.layout != torch.strided:
            raise TypeError(f"{name} has layout {action.layout}; allowed: a dense (strided) tensor")
        if not action.is_floating_point():
            raise TypeError(
                f"{name} has dtype {action.dtype}; allowed: a floating-point latent (float32 numpy, "
                f"or a float torch tensor)"
            )
        if tuple(action.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(action.shape)}; allowed: {expected}")
        if action.device != self.device:
            raise ValueError(f"{name} is on {action.device}; allowed: the environment's device {self.device}")
        # One fused min/max pass answers all three questions (NaN propagates and compares False),
        # so a valid step costs one reduction and one sync.
        low, high = torch.aminmax(action)
        if not bool((low >= -self.latent_bound) & (high <= self.latent_bound)):
            if not bool(torch.isfinite(action).all()):
                raise ValueError(f"{name} contains NaN or inf; allowed: finite latent values")
            raise ValueError(
                f"{name} has values up to {float(action.abs().max()):g} in magnitude; allowed: "
                f"[-{self.latent_bound:g}, {self.latent_bound:g}] (the action space's bounds)"
            )
        return action.to(self.dtype, copy=True)

    def step(self, action: torch.Tensor) -> CoreStepResult:
        """Takes x_{t-1} = action. On the last step, decodes it and pays the reward.

        The state changes only once everything has succeeded: a rejected action or a reward that
        raises leaves the latents, the step index and the prompts as they were.

        Raises:
            EpisodeStateError: before ``reset`` or after the last step.
            TypeError, ValueError: for a bad action (see :meth:`check_action`).
            RewardError: if the reward function fails.
        """
        self.require_reset()
        if self.episode_over:
            raise EpisodeStateError(
                f"the episode ended after {self.num_steps} steps; call reset() to start a new one"
            )
        next_latents = self.check_action(action)
        terminated = self.step_index + 1 == self.num_steps
        if terminated:
            images = self.backend.decode(next_latents)
            result = self.reward(images, self.prompts, self.metadata)
            outcome = CoreStepResult(result.rewards, True, images, result.details)
        else:
            outcome = CoreStepResult(torch.zeros(self.num_envs, device=self.device), False)
        self.latents = next_latents
        self.step_index += 1
        return outcome

    @torch.no_grad()
    def predicted_clean_images(self) -> torch.Tensor:
        """Decoded x0-prediction of the current latents ``(N, H, W, 3)`` uint8 (the final images at the end)."""
        self.require_reset()
        if self.episode_over:
            return self.backend.decode(self.latents)
        step_index = self.step_indices()
        timesteps = self.sampler.timesteps[step_index]
        output = self.backend.predict(self.latents, timesteps, self.conditioning, self.guidance_scale)
        return self.backend.decode(self.sampler.predicted_clean(self.latents, output, step_index))
