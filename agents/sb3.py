"""Stable-Baselines3 on the DiffusionDenoise environment.

SB3 steps its own ``VecEnv`` type, not a Gymnasium ``VectorEnv``. :class:`SB3VecEnvAdapter`
presents the native batched environment as one, so that ``PPO(..., env=adapter)`` runs all N
episodes as one batch on the device. (The single environment needs no adapter: SB3's
``DummyVecEnv([lambda: gym.make("DiffusionDenoise-v0")])`` accepts it as it is.)

:class:`DiffusionActorCriticPolicy` is an SB3 actor-critic whose actor is the denoiser's own
Gaussian transition, built from a registered model name, so that SB3's PPO or A2C fine-tunes the
diffusion model and ``save``/``load`` work as for any SB3 policy:

    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=8, autoreset_mode=AutoresetMode.SAME_STEP)
    model = PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), ent_coef=0.0)
    model.learn(1_600)
    model.save("ppo_diffusion")
    model = PPO.load("ppo_diffusion", env=SB3VecEnvAdapter(envs))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from agents.policy import GaussianDenoisingPolicy
from agents.step_window import StepWindow
from diffusion_env.backends import DenoiserBackend, available_models, make_denoiser
from diffusion_env.backends.base import backend_sampler
from diffusion_env.envs import DEFAULT_MODEL, DiffusionDenoiseVectorEnv
from diffusion_env.samplers import Sampler
from diffusion_env.validation import check_float, check_int


class SB3VecEnvAdapter(VecEnv):
    """A ``DiffusionDenoiseVectorEnv`` seen as an SB3 ``VecEnv``.

    The vector environment must return numpy arrays and reset in the same step
    (``autoreset_mode=AutoresetMode.SAME_STEP``), which is SB3's convention: when an episode ends,
    ``step_wait`` returns the next episode's first observation and puts the terminal one in
    ``infos[i]["terminal_observation"]``.

    All N sub-environments share one seeded generator (see ``DiffusionDenoiseVectorEnv``), so
    ``seed(s)`` seeds the batch with ``s``; attribute access goes to the one vector environment.
    """

    def __init__(self, vector_env: gym.vector.VectorEnv) -> None:
        env = vector_env.unwrapped
        if not isinstance(env, DiffusionDenoiseVectorEnv):
            raise TypeError(f"expected a DiffusionDenoiseVectorEnv, got {type(env).__name__}")
        if env.array_type != "numpy" or env.autoreset_mode != AutoresetMode.SAME_STEP:
            raise ValueError(
                "SB3 needs numpy arrays and same-step autoreset; make the env with "
                "gym.make_vec('DiffusionDenoise-v0', num_envs=N, autoreset_mode=AutoresetMode.SAME_STEP)"
            )
        self.vector_env = env
        self._actions: np.ndarray | None = None
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self) -> VecEnvObs:
        obs, info = self.vector_env.reset(seed=self._seeds[0])
        self.reset_infos = [{"prompt": prompt} for prompt in info["prompt"]]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.float32)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, info = self.vector_env.step(self._actions)
        dones = terminated | truncated
        infos: list[dict[str, Any]] = []
        for i in range(self.num_envs):
            env_info: dict[str, Any] = {"TimeLimit.truncated": bool(truncated[i] and not terminated[i])}
            if dones[i]:
                final_info = info["final_info"]
                env_info["terminal_observation"] = info["final_obs"][i]
                env_info["prompt"] = final_info["prompt"][i]
                env_info["image"] = final_info["image"][i]
                env_info["reward_details"] = {
                    key: value[i] for key, value in final_info["reward_details"].items() if not key.startswith("_")
                }
            else:
                env_info["prompt"] = info["prompt"][i]
            infos.append(env_info)
        if dones.all():
            self.reset_infos = [{"prompt": prompt} for prompt in info["prompt"]]
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.vector_env.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        frames = self.vector_env.render()
        return list(frames) if frames is not None else [None] * self.num_envs

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.vector_env, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.vector_env, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any) -> list[Any]:
        result = getattr(self.vector_env, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


class DiffusionActorCriticPolicy(ActorCriticPolicy):
    """An SB3 ``ActorCriticPolicy`` whose action distribution is the denoiser's Gaussian transition.

    ``PPO(DiffusionActorCriticPolicy, env)`` fine-tunes the built-in model on the default
    environment; for another environment, name the same model and sampler settings in
    ``policy_kwargs`` (``model``, ``num_inference_steps``, ``eta``, ``guidance_scale``). The policy
    builds its own copy of the model from the registered name (``make_denoiser(model)``) and
    its sampler (``backend_sampler(backend, num_inference_steps, eta=eta)``, as the environment does), so that
    everything SB3 saves is a plain value: ``model.save(path)`` stores these settings in the
    zip's ``data`` and the network's weights (the UNet, any LoRA adapters, the critic) in the
    policy's state dict, and ``PPO.load(path, env=env)`` rebuilds the same policy. A model that
    is not registered is not accepted; register it with
    :func:`diffusion_env.backends.register_model` first. (The environment keeps its own copy of
    the model, from which it renders and decodes; the policy's copy is the one trained.)

    The actor is a :class:`~agents.policy.GaussianDenoisingPolicy` (``policy.actor``: mean from
    the network, with classifier-free guidance and any LoRA adapters; sigma_t from the sampler),
    so the log-likelihoods SB3 stores and recomputes are the sampler's exact ones. The critic is a
    small MLP on the timestep, each conditioning entry mean-pooled over its tokens and the latent
    average-pooled to 4x4.

    SB3 defaults that do not fit a 3,072- to 16,384-dimensional Gaussian over the next latent are
    handled here: there is no state-independent ``log_std`` parameter (sigma_t is the sampler's);
    orthogonal re-initialisation is off (it would overwrite the pretrained UNet); the entropy,
    D/2 (1 + log 2 pi) + D log sigma_t (0 at deterministic steps, which have no density), does
    not depend on the parameters, so an entropy bonus only shifts the loss (use ``ent_coef=0``);
    SB3 clips actions to the action box before stepping, whose bound (``latent_bound``, 100)
    leaves the sampler's actions untouched.

    PPO's clip on the exact ratio exp(log p - log p_old) of a D-dimensional Gaussian is very
    tight: a few optimiser steps move log p by nats, far beyond ``clip_range=0.2``.
    ``per_dimension_ratio=True`` makes the log-likelihoods SB3 stores and recomputes the
    sampler's ``log_prob_per_dimension``, log p / D, so that SB3's ratio is DDPO's per-dimension
    ratio exp((log p - log p_old) / D) and ``clip_range`` means what DDPO's clip range means
    (1e-4 in DDPO on Stable Diffusion, 1e-3 in this project's configs for the built-in model).
    The gradient's direction is unchanged; the entropy is divided by D as well.

    ``min_sigma`` and ``max_sigma`` pick the trained steps with :class:`~agents.step_window.StepWindow`,
    as ``DDPOConfig`` does: outside the window the recomputed log-likelihoods are detached, so
    their ratio is 1 and they add no gradient. On the built-in model the step to t = 1
    (sigma 0.015) alone gives two thirds of the policy gradient's norm
    (``benchmarks/gradient_by_step.py``), which is pixel-level texture rather than the prompted
    scene.

    Adam's ``eps`` is 1e-8 (PyTorch's default) unless ``optimizer_kwargs`` says otherwise: SB3
    sets 1e-5 for its policies, and the gradients of the per-dimension log-likelihood are smaller
    than that (median |g| about 1e-7 on the built-in model's UNet), so with SB3's value Adam's
    steps shrink to a fraction of the learning rate and the UNet hardly moves.

    The policy checks the observation space against its model when it is built (latent shape,
    conditioning entries, the scheduler's timestep range) and every observation's timestep
    against its schedule, raising a ``ValueError`` that names ``num_inference_steps``. A policy
    whose schedule holds every timestep of the environment's (on the registered models, 20 steps
    against an environment of 2, 4, 5 or 10, whose timesteps are a subset), or that differs only
    in ``eta``, cannot be told apart from observations: give the environment's settings.

    Args:
        model: a registered model name (:func:`diffusion_env.backends.available_models`); default
            ``"shapes32"``, the environment's default.
        num_inference_steps: K, as the environment's (default 20, the environment's default).
        eta: the sampler's eta, as the environment's (None: the sampler's default, as the environment's).
        guidance_scale: classifier-free guidance weight (None: the model's default, as the environment's).
        lora_rank: 0 fine-tunes the whole network; r >= 1 freezes it and trains rank-r LoRA
            adapters (:meth:`~agents.policy.GaussianDenoisingPolicy.add_lora`).
        lora_seed: seeds the adapters' initialisation.
        value_hidden: width of the critic's hidden layers.
        per_dimension_ratio: report log p / D instead of log p (see above).
        min_sigma, max_sigma: the window of sigma_t trained on (see above); 0 and inf train on all.
        other arguments: as ``ActorCriticPolicy`` (``net_arch``, ``log_std_init``, ``use_sde``
            and the feature extractor are not used).
    """

    def __init__(
        self,
        observation_space: gym.spaces.Dict,
        action_space: gym.spaces.Box,
        lr_schedule: Schedule,
        model: str = DEFAULT_MODEL,
        num_inference_steps: int = 20,
        eta: float | None = None,
        guidance_scale: float | None = None,
        lora_rank: int = 0,
        lora_seed: int = 0,
        value_hidden: int = 64,
        per_dimension_ratio: bool = False,
        min_sigma: float = 0.0,
        max_sigma: float = math.inf,
        **kwargs: Any,
    ) -> None:
        if "denoising_policy" in kwargs:
            raise TypeError(
                "denoising_policy is not accepted (SB3 would pickle the whole model into the saved zip); "
                "allowed: the model's registered name and sampler settings, e.g. policy_kwargs={'model': "
                "registered_name(env.unwrapped.backend), 'num_inference_steps': env.unwrapped.num_inference_steps}"
            )
        if not isinstance(model, str):
            raise TypeError(
                f"model={model!r}; allowed: a model's name (registered: {available_models()}), a hub id or a pipeline "
                "folder: SB3 saves the policy's settings, so the model must be named, not given as an object"
            )
        if kwargs.get("use_sde"):
            raise ValueError("use_sde=True replaces the sampler's noise; allowed: use_sde=False")
        # Plain values only (ActorCriticPolicy.__init__ ends by calling _build, which reads them):
        # they are what SB3 saves to rebuild the policy.
        self.model = model
        self.num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1)
        self.eta = None if eta is None else check_float("eta", eta)
        self.guidance_scale = None if guidance_scale is None else check_float("guidance_scale", guidance_scale, 0.0)
        self.lora_rank = check_int("lora_rank", lora_rank, 0)
        self.lora_seed = check_int("lora_seed", lora_seed)
        self.value_hidden = check_int("value_hidden", value_hidden, 1)
        self.per_dimension_ratio = bool(per_dimension_ratio)
        self.step_window = StepWindow(min_sigma, max_sigma)
        kwargs["ortho_init"] = False
        if kwargs.get("optimizer_kwargs") is None:
            kwargs["optimizer_kwargs"] = {"eps": 1e-8}
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _make_sampler(self, backend: DenoiserBackend) -> Sampler:
        """The sampler of ``backend``'s scheduler with this policy's settings, on the back-end's device."""
        options = {} if self.eta is None else {"eta": self.eta}
        return backend_sampler(backend, self.num_inference_steps, **options)

    def _build(self, lr_schedule: Schedule) -> None:
        # Building the model does not draw from torch's generator, which SB3's ``seed`` has just
        # seeded for the critic's initialisation and the policy's noise.
        with torch.random.fork_rng(devices=[]):
            backend = make_denoiser(self.model)
        if not isinstance(backend, nn.Module):
            raise TypeError(
                f"model {self.model!r} builds a {type(backend).__name__}, which is not a torch.nn.Module; "
                "allowed: a back-end that is one (e.g. a BackendModule), so that SB3 can move and save its weights"
            )
        sampler = self._make_sampler(backend)
        self._check_observation_space(backend, sampler)
        self.step_window.steps(sampler)  # raises if the window holds no step
        guidance_scale = backend.default_guidance_scale if self.guidance_scale is None else self.guidance_scale
        self.actor = GaussianDenoisingPolicy(backend, sampler, guidance_scale)
        if self.lora_rank > 0:
            self.actor.add_lora(self.lora_rank, seed=self.lora_seed)
        latent_channels = backend.latent_shape[0]
        conditioning_width = sum(shape[-1] if shape else 1 for shape in backend.conditioning_shapes.values())
        self.value_net = nn.Sequential(
            nn.Linear(1 + conditioning_width + latent_channels * 16, self.value_hidden),
            nn.SiLU(),
            nn.Linear(self.value_hidden, self.value_hidden),
            nn.SiLU(),
            nn.Linear(self.value_hidden, 1),
        )
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    def _check_observation_space(self, backend: DenoiserBackend, sampler: Sampler) -> None:
        """Raises ``ValueError`` unless the environment's observations are ones of this policy's model."""
        expected = {"latent": tuple(backend.latent_shape), "timestep": (1,)}
        expected.update({key: tuple(shape) for key, shape in backend.conditioning_shapes.items()})
        space = self.observation_space
        found = {key: tuple(entry.shape) for key, entry in space.spaces.items()} if isinstance(space, gym.spaces.Dict) else {}
        problem = None
        if found != expected:
            problem = f"the observation space holds {found}, model {self.model!r} observes {expected}"
        elif float(space["timestep"].high[0]) != float(sampler.max_timestep):
            problem = (
                f"the environment's timesteps reach {float(space['timestep'].high[0]):g}, model "
                f"{self.model!r}'s scheduler {float(sampler.max_timestep):g}"
            )
        if problem is not None:
            raise ValueError(
                f"{problem}; allowed: the environment's model, policy_kwargs={{'model': <its registered name>}} "
                f"(registered: {available_models()})"
            )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> DiffusionActorCriticPolicy:
        # SB3 builds the policy on the CPU and then moves it (``.to(device)``): the sampler's
        # tables, which are not module state, follow the network.
        super()._apply(fn, *args, **kwargs)
        actor = self._modules.get("actor")
        if actor is not None and actor.sampler.timesteps.device != actor.device:
            actor.sampler = self._make_sampler(actor.backend)
        return self

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            model=self.model,
            num_inference_steps=self.num_inference_steps,
            eta=self.eta,
            guidance_scale=self.guidance_scale,
            lora_rank=self.lora_rank,
            lora_seed=self.lora_seed,
            value_hidden=self.value_hidden,
            per_dimension_ratio=self.per_dimension_ratio,
            min_sigma=self.step_window.min_sigma,
            max_sigma=self.step_window.max_sigma,
        )
        return data

    def _transition(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The actor's mean ``(B, C, H, W)`` and the step indices ``(B,)`` of a batch of observations.

        Raises:
            ValueError: if a timestep is not a step of this policy's schedule.
        """
        sampler = self.actor.sampler
        try:
            step_index = sampler.step_index_of(obs["timestep"])
        except ValueError as error:
            raise ValueError(
                f"the observation is not one of this policy's schedule (model {self.model!r}, "
                f"num_inference_steps={self.num_inference_steps}, eta={self.eta}): {error}; allowed: the "
                "environment's settings, policy_kwargs={'num_inference_steps': env.unwrapped.num_inference_steps, ...}"
            ) from error
        return self.actor.mean(obs), step_index

    def _log_prob(self, actions: torch.Tensor, mean: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """What SB3 stores and recomputes: the sampler's log p, or log p / D with ``per_dimension_ratio``."""
        sampler = self.actor.sampler
        log_prob = sampler.log_prob_per_dimension if self.per_dimension_ratio else sampler.log_prob
        return log_prob(actions.reshape(mean.shape), mean, step_index)

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = obs["latent"].shape[0]
        # Each conditioning entry (B, *shape) mean-pooled to (B, shape[-1]), e.g. over its tokens.
        conditioning = [
            obs[key].float().reshape(batch, -1, shape[-1] if shape else 1).mean(dim=1)
            for key, shape in self.actor.backend.conditioning_shapes.items()
        ]
        features = torch.cat(
            [
                obs["timestep"].reshape(-1, 1).float() / (self.actor.sampler.max_timestep + 1.0),
                *conditioning,
                nn.functional.adaptive_avg_pool2d(obs["latent"].float(), 4).flatten(1),
            ],
            dim=1,
        )
        return self.value_net(features)

    def forward(
        self, obs: dict[str, torch.Tensor], deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, step_index = self._transition(obs)
        if deterministic:
            actions = mean
        else:
            # torch's global generator, which SB3's ``seed`` seeds.
            actions = self.actor.sampler.sample(mean, step_index, torch.randn_like(mean))
        return actions.float(), self.predict_values(obs), self._log_prob(actions, mean, step_index)

    def evaluate_actions(
        self, obs: dict[str, torch.Tensor], actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, step_index = self._transition(obs)
        log_prob = self._log_prob(actions, mean, step_index)
        trained = self.step_window.contains(self.actor.sampler, step_index)
        log_prob = torch.where(trained, log_prob, log_prob.detach())
        sampler = self.actor.sampler
        index = step_index.to(sampler.sigma.device)
        sigma, stochastic = sampler.sigma[index].to(log_prob.device), sampler.stochastic[index].to(log_prob.device)
        # Per latent dimension (0 at deterministic steps); times D unless SB3 sees log p / D.
        entropy = 0.5 * (1.0 + math.log(2.0 * math.pi)) + torch.log(torch.where(stochastic, sigma, 1.0))
        entropy = torch.where(stochastic, entropy, 0.0).to(log_prob.dtype)
        if not self.per_dimension_ratio:
            entropy = entropy * mean[0].numel()
        return self.predict_values(obs), log_prob, entropy

    def _predict(self, observation: dict[str, torch.Tensor], deterministic: bool = False) -> torch.Tensor:
        return self.forward(observation, deterministic)[0]
