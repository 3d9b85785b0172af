"""Stable-Baselines3 on the DiffusionDenoise environment.

SB3 steps its own ``VecEnv`` type, not a Gymnasium ``VectorEnv``. :class:`SB3VecEnvAdapter`
presents the native batched environment as one, so that ``PPO(..., env=adapter)`` runs all N
episodes as one batch on the device. (The single environment needs no adapter: SB3's
``DummyVecEnv([lambda: gym.make("DiffusionDenoise-v0")])`` accepts it as it is.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

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
