"""Stable-Baselines3 on the DiffusionDenoise environment.

SB3 steps its own ``VecEnv`` type, not a Gymnasium ``VectorEnv``. :class:`SB3VecEnvAdapter`
presents the native batched environment as one, so that ``PPO(..., env=adapter)`` runs all N
episodes as one batch on the device. (The single environment needs no adapter: SB3's
``DummyVecEnv([lambda: gym.make("DiffusionDenoise-v0")])`` accepts it as it is.)

:class:`DiffusionActorCriticPolicy` is an SB3 actor-critic whose actor is the denoiser's own
Gaussian transition, so that SB3's PPO or A2C fine-tunes the diffusion model:

    policy = GaussianDenoisingPolicy.from_env(envs)
    PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), ent_coef=0.0,
        policy_kwargs={"denoising_policy": policy})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
from torch import nn

from agents.policy import GaussianDenoisingPolicy
from diffusion_env.envs import DiffusionDenoiseVectorEnv


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

    The actor is a :class:`~agents.policy.GaussianDenoisingPolicy` (mean from the UNet, with
    classifier-free guidance and any LoRA adapters it carries; sigma_t from the scheduler), so the
    log-likelihoods SB3 stores and recomputes are the exact ones ``agents`` computes. The critic is
    a small MLP on the timestep, the mean-pooled prompt embedding and the latent average-pooled to
    4x4.

    SB3 defaults that do not fit a 3,072- to 16,384-dimensional Gaussian over the next latent are
    handled here: there is no state-independent ``log_std`` parameter (sigma_t is the sampler's);
    orthogonal re-initialisation is off (it would overwrite the pretrained UNet); the entropy,
    D/2 (1 + log 2 pi) + D log sigma_t, does not depend on the parameters, so an entropy bonus
    only shifts the loss (use ``ent_coef=0``); SB3 clips actions to the action box before stepping,
    whose bound (``latent_bound``, 100) leaves the sampler's actions untouched.

    PPO's clip on the exact ratio exp(log p - log p_old) of a D-dimensional Gaussian is very
    tight: a few optimiser steps move log p by nats, far beyond ``clip_range=0.2``.
    ``per_dimension_ratio=True`` makes the log-likelihoods SB3 stores and recomputes log p / D,
    so that SB3's ratio is DDPO's per-dimension ratio exp((log p - log p_old) / D) and
    ``clip_range`` means what DDPO's clip range means (1e-4 in DDPO on Stable Diffusion, 1e-3 in
    this project's configs for the built-in model). The gradient's direction is unchanged; the
    entropy is divided by D as well.

    ``min_sigma`` keeps the steps with sigma_t below it out of training, as ``DDPOConfig.min_sigma``
    does: their recomputed log-likelihoods are detached, so their ratio is 1 and they add no
    gradient. On the built-in model the step to t = 1 (sigma 0.015) alone gives two thirds of the
    policy gradient's norm (``benchmarks/gradient_by_step.py``), which is pixel-level texture
    rather than the prompted scene.

    Adam's ``eps`` is 1e-8 (PyTorch's default) unless ``optimizer_kwargs`` says otherwise: SB3
    sets 1e-5 for its policies, and the gradients of the per-dimension log-likelihood are smaller
    than that (median |g| about 1e-7 on the built-in model's UNet), so with SB3's value Adam's
    steps shrink to a fraction of the learning rate and the UNet hardly moves.

    Args:
        denoising_policy: the actor, e.g. ``GaussianDenoisingPolicy.from_env(envs)``.
        value_hidden: width of the critic's hidden layers.
        per_dimension_ratio: report log p / D instead of log p (see above).
        min_sigma: steps with sigma_t below this are not trained on (see above); 0 trains on all.
        other arguments: as ``ActorCriticPolicy`` (``net_arch``, ``log_std_init``, ``use_sde``
            and the feature extractor are not used).
    """

    def __init__(
        self,
        observation_space: gym.spaces.Space,
        action_space: gym.spaces.Space,
        lr_schedule: Any,
        denoising_policy: GaussianDenoisingPolicy,
        value_hidden: int = 64,
        per_dimension_ratio: bool = False,
        min_sigma: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(denoising_policy, GaussianDenoisingPolicy):
            raise TypeError(f"denoising_policy must be a GaussianDenoisingPolicy, got {type(denoising_policy).__name__}")
        largest_sigma = float(denoising_policy.sampler.sigma.max())
        if not 0.0 <= min_sigma <= largest_sigma:
            raise ValueError(
                f"min_sigma={min_sigma} would train on no step (largest sigma_t {largest_sigma:.4g}); "
                f"allowed: 0 <= min_sigma <= {largest_sigma:.4g}"
            )
        if kwargs.get("use_sde"):
            raise ValueError("use_sde=True replaces the sampler's noise; allowed: use_sde=False")
        # ActorCriticPolicy.__init__ ends by calling _build; these reach it before nn.Module's
        # own attribute handling is ready, hence the plain object attributes.
        object.__setattr__(self, "_pending_actor", denoising_policy)
        object.__setattr__(self, "_pending_value_hidden", value_hidden)
        object.__setattr__(self, "_pending_per_dimension_ratio", bool(per_dimension_ratio))
        object.__setattr__(self, "_pending_min_sigma", float(min_sigma))
        kwargs["ortho_init"] = False
        if kwargs.get("optimizer_kwargs") is None:
            kwargs["optimizer_kwargs"] = {"eps": 1e-8}
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Any) -> None:
        self.actor = self.__dict__.pop("_pending_actor")
        hidden = self.__dict__.pop("_pending_value_hidden")
        num_dims = math.prod(self.action_space.shape)
        self.log_prob_scale = 1.0 / num_dims if self.__dict__.pop("_pending_per_dimension_ratio") else 1.0
        self.min_sigma = self.__dict__.pop("_pending_min_sigma")
        channels = self.observation_space["latent"].shape[0]
        embedding_dim = self.observation_space["prompt_embedding"].shape[-1]
        self.num_train_timesteps = float(self.observation_space["timestep"].high[0] + 1)
        self.value_net = nn.Sequential(
            nn.Linear(1 + embedding_dim + channels * 16, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)

    def predict_values(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        features = torch.cat(
            [
                obs["timestep"].reshape(-1, 1).float() / self.num_train_timesteps,
                obs["prompt_embedding"].float().mean(dim=1),
                nn.functional.adaptive_avg_pool2d(obs["latent"].float(), 4).flatten(1),
            ],
            dim=1,
        )
        return self.value_net(features)

    def forward(
        self, obs: dict[str, torch.Tensor], deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if deterministic:
            actions = self.actor.mean(obs)
            log_prob = self.actor.log_prob(obs, actions)
        else:
            actions, log_prob = self.actor.sample_with_log_prob(obs)
        return actions.float(), self.predict_values(obs), log_prob * self.log_prob_scale

    def evaluate_actions(
        self, obs: dict[str, torch.Tensor], actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_prob = self.actor.log_prob(obs, actions)
        sigma = self.actor.std(obs)
        log_prob = torch.where(sigma >= self.min_sigma, log_prob, log_prob.detach())
        num_dims = actions[0].numel()
        entropy = num_dims * (0.5 * (1.0 + math.log(2.0 * math.pi)) + torch.log(sigma))
        return self.predict_values(obs), log_prob * self.log_prob_scale, entropy * self.log_prob_scale

    def _predict(self, observation: dict[str, torch.Tensor], deterministic: bool = False) -> torch.Tensor:
        return self.forward(observation, deterministic)[0]
