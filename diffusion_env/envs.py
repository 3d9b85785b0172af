"""``DiffusionDenoise-v0``: the single environment and its native vector environment.

Both are thin views of one :class:`~diffusion_env.core.DenoisingCore`; the single environment is
the core with a batch of one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from diffusion_env.core import DEFAULT_MODEL, DenoisingCore

__all__ = ["DEFAULT_MODEL", "DiffusionDenoiseEnv", "DiffusionDenoiseVectorEnv"]

ArrayType = Literal["numpy", "torch"]



def _numpy_action(action: Any, space: gym.spaces.Box, core: DenoisingCore) -> torch.Tensor:
    """Turns a numpy action of ``space`` into a tensor on the core's device, or says what is wrong."""
    if not isinstance(action, np.ndarray):
        raise TypeError(
            f"action must be a numpy array of dtype {space.dtype} and shape {space.shape}, got "
            f"{type(action).__name__} (pass array_type='torch' to the vector env to step with tensors)"
        )
    if action.dtype != space.dtype:
        raise TypeError(f"action has dtype {action.dtype}; allowed: {space.dtype} (the action space's dtype)")
    if action.shape != space.shape:
        raise ValueError(f"action has shape {action.shape}; allowed: {space.shape}")
    # Views with negative or odd strides (a[..., ::-1]) are valid actions; torch needs a contiguous copy.
    return torch.from_numpy(np.ascontiguousarray(action)).to(core.device)


#: The keys ``reset(options=...)`` understands (see the environments' "Reset options").
RESET_OPTIONS = ("shared_noise", "branch")


def _reset_core_with(core: DenoisingCore, rng: np.random.Generator, options: Mapping[str, Any] | None, batched: bool) -> None:
    """Resets ``core`` as ``reset(options=options)`` asks: new episodes (optionally with shared noise) or a branch.

    Raises:
        ValueError, TypeError: for an unknown option or a value it does not allow (the message
            says what is allowed).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(RESET_OPTIONS))
    if unknown:
        raise ValueError(f"reset options {unknown} are not known; allowed: {list(RESET_OPTIONS)}")
    if "branch" not in options:
        shared_noise = options.get("shared_noise", False)
        if not isinstance(shared_noise, bool):
            raise TypeError(f"options['shared_noise']={shared_noise!r}; allowed: True or False")
        core.reset(rng, shared_noise=shared_noise)
        return
    if "shared_noise" in options:
        raise ValueError("reset options 'branch' and 'shared_noise' exclude each other; allowed: one of them")
    branch = options["branch"]
    if not isinstance(branch, Mapping) or set(branch) != {"latents", "step_index"}:
        raise ValueError(f"options['branch']={branch!r}; allowed: a dict with the keys 'latents' and 'step_index'")
    latents = branch["latents"]
    if isinstance(latents, np.ndarray):
        latents = torch.from_numpy(np.ascontiguousarray(latents)).to(core.device)
    if isinstance(latents, torch.Tensor) and not batched:
        latents = latents[None]
    core.branch(latents, branch["step_index"])


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A new numpy array (never a view of the environment's state)."""
    return np.array(tensor.detach().to(torch.float32 if tensor.is_floating_point() else tensor.dtype).cpu().numpy())


def _core_attribute(name: str, doc: str) -> property:
    """A read-only property that shows the core's attribute ``name``."""
    return property(lambda view: getattr(view.core, name), doc=doc)


class _DenoisingView:
    """What both environments expose of their MDP to policies and tools, as public properties."""

    core: DenoisingCore

    backend = _core_attribute("backend", "The denoiser back-end (a ``DenoiserBackend``; its network is what a policy fine-tunes).")
    sampler = _core_attribute("sampler", "The per-step Gaussian policy of the back-end's scheduler (a ``Sampler``).")
    reward = _core_attribute("reward", "The reward paid on the last step (a checked ``Reward``).")
    prompt_set = _core_attribute("prompt_set", "The prompts each reset draws from (a ``PromptSet``).")
    guidance_scale = _core_attribute("guidance_scale", "The classifier-free guidance weight of the model's own policy.")
    num_inference_steps = _core_attribute("num_steps", "K, the steps of an episode.")
    samples_per_prompt = _core_attribute(
        "samples_per_prompt", "G, the consecutive episodes that share a prompt (a group) at each reset."
    )
    step_index = _core_attribute(
        "step_index", "The step index k of the current latents (-1 before the first reset, K once the episode is over)."
    )

    @property
    def prompts(self) -> list[str]:
        """The current episodes' prompts (a copy)."""
        return list(self.core.prompts)

    @property
    def prompt_metadata(self) -> list[dict[str, Any]]:
        """What the prompt set knows about each current prompt (copies), as the reward receives it."""
        return [dict(meta) for meta in self.core.metadata]

    @property
    def conditioning_keys(self) -> tuple[str, ...]:
        """The observation's conditioning entries, as the back-end declares them."""
        return tuple(self.core.backend.conditioning_shapes)


class DiffusionDenoiseEnv(_DenoisingView, gym.Env):
    """The sampling loop of a text-to-image diffusion model as a Markov decision process.

    ## Description

    An episode is the generation of one image: it starts from pure noise x_T ~ N(0, I) and a prompt
    c drawn from a prompt set; at each of K steps the agent chooses the next, less noisy latent
    x_{t-1}; after the last step the latent is decoded into an image and scored by a reward
    function (Black et al., 2023, "Training Diffusion Models with Reinforcement Learning", Sec. 4.1).
    The pretrained model's own sampler is one policy of this MDP; build it with
    ``agents.GaussianDenoisingPolicy.from_env(env)``, which reads the public properties
    ``backend``, ``sampler`` and ``guidance_scale``; ``prompts`` and ``prompt_metadata`` describe
    the current episode.

    ## Action Space

    ``Box(-latent_bound, latent_bound, (C, H, W), float32)``: the next latent x_{t-1}. Actions of
    another shape or dtype, containing NaN or inf, or outside the bounds are refused with an
    exception and leave the state unchanged.

    ## Observation Space

    ``Dict`` of float32 arrays:

    - ``"latent"``: ``(C, H, W)``, the current latent x_t.
    - ``"timestep"``: ``(1,)``, the scheduler timestep t the denoiser is conditioned on at this
      step, from about ``num_train_timesteps`` down to the last denoising timestep; -1 in the
      terminal observation, where no step remains.
    - the conditioning entries the back-end declares; for the built-in model one,
      ``"prompt_embedding"``: ``(L, D)``, the prompt encoder's token embeddings.

    Observations are new arrays: changing one does not change the environment.

    Stable-Baselines3's ``check_env`` warns that the latent looks like an image that is not uint8
    and that the action space is not in [-1, 1]: both are intended. SB3's default CNN and MLP
    policies do not fit this action; use a diffusion policy (``agents``), not a flattened latent.

    ## Rewards

    0 on every step but the last; on the last, the reward function's score of the decoded image
    (default ``jpeg_compressibility``: minus the JPEG size in kB at quality 95).

    ## Starting State

    x_T ~ N(0, I) from the environment's seeded generator, and a prompt drawn uniformly from the
    prompt set.

    ## Reset options

    ``reset(options=...)`` takes a dict with at most one of:

    - ``"shared_noise"``: ``True`` starts the ``samples_per_prompt`` consecutive episodes of each
      prompt (a group) from the same x_T, drawn once per group, so that groups differ from each
      other (DanceGRPO's shared initial noise: Xue et al., 2025). ``False`` (the default) draws
      x_T per episode. Autoresets of the vector environment draw x_T per episode.
    - ``"branch"``: ``{"latents": x, "step_index": k}`` restarts the current episodes, with their
      prompts, from the latents ``x`` (``(C, H, W)``, batched ``(N, C, H, W)``; numpy or torch) at
      step index k in ``[0, K)``: the next step is step k. Nothing is drawn. Episodes given the
      same latents share their trajectory up to step k and may differ after it (branching:
      TempFlow-GRPO, He et al., 2025; BranchGRPO, Li et al., 2025). Latents are checked as
      actions are.

    ## Episode End

    ``terminated=True`` after ``num_inference_steps`` steps. There is no truncation.

    ## Info

    ``"prompt"`` at every step; on the last step also ``"image"`` (the decoded image, uint8
    ``(H, W, 3)``) and ``"reward_details"`` (the reward's per-image figures).

    ## Arguments

    - ``model``: a registered model name or a ``DenoiserBackend`` (default ``"shapes32"``, the built-in model).
    - ``reward``: a registered reward name or a callable ``(images, prompts, metadata) -> rewards``.
    - ``prompts``: a prompt-set name, a list of prompts or a ``PromptSet``.
    - ``num_inference_steps``: K (default 20).
    - ``eta``: DDIM's eta in (0, 1] (default: the sampler's, 1.0 for DDIM as in DDPO).
    - ``sampler``: a registered sampler name or factory (default: the one of the back-end's
      scheduler type, see :mod:`diffusion_env.samplers`); ``sampler_options``: its options.
    - ``guidance_scale``: classifier-free guidance weight for the model's policy and the rendered
      prediction (default: the model's own).
    - ``device``, ``dtype``: where and in what precision the model runs.
    - ``latent_bound``: bound of the action and latent boxes (default 100).
    - ``render_mode``: ``"rgb_array"`` renders the decoded x0-prediction of the current latent.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **options: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; allowed: {self.metadata['render_modes']} or None")
        self.core = DenoisingCore(1, **options)
        self.render_mode = render_mode
        self.observation_space = self.core.single_observation_space()
        self.action_space = self.core.single_action_space()
        self._conditioning: dict[str, np.ndarray] = {}

    def _observation(self) -> dict[str, np.ndarray]:
        return {
            "latent": _to_numpy(self.core.latents[0]),
            "timestep": _to_numpy(self.core.timesteps()[:1]),
            # A fresh array per call: users keep observations, and Gymnasium's checker requires it.
            **{key: value.copy() for key, value in self._conditioning.items()},
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        _reset_core_with(self.core, self.np_random, options, batched=False)
        # The conditioning is fixed for the episode: convert it once, not at every step.
        self._conditioning = {key: _to_numpy(value[0]) for key, value in self.core.conditioning.items()}
        return self._observation(), {"prompt": self.core.prompts[0]}

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        self.core.require_reset()
        result = self.core.step(_numpy_action(action, self.action_space, self.core)[None])
        info: dict[str, Any] = {"prompt": self.core.prompts[0]}
        if result.terminated:
            info["image"] = result.images[0].cpu().numpy()
            info["reward_details"] = {k: v[0] for k, v in result.reward_details.items()}
        return self._observation(), float(result.rewards[0]), result.terminated, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() was called without a render_mode; pass render_mode='rgb_array'")
            return None
        return self.core.predicted_clean_images()[0].cpu().numpy()


class DiffusionDenoiseVectorEnv(_DenoisingView, VectorEnv):
    """N denoising episodes stepped as one batch on the device: ``gym.make_vec("DiffusionDenoise-v0", num_envs=N)``.

    Same MDP, spaces (batched) and arguments as :class:`DiffusionDenoiseEnv`, plus:

    - ``num_envs``: N.
    - ``autoreset_mode``: ``AutoresetMode.NEXT_STEP`` (default; the step after the last one
      resets every environment, ignores the action and returns reward 0) or
      ``AutoresetMode.SAME_STEP`` (the last step returns the new episodes' first observation, with
      the terminal one in ``info["final_obs"]`` and its info in ``info["final_info"]``).
    - ``array_type``: ``"numpy"`` (default) or ``"torch"``: actions, observations, rewards and
      flags are then torch tensors on the environment's device, with no copy to the host.
    - ``samples_per_prompt``: G (default 1). Each reset draws N / G prompts and gives each to G
      consecutive environments (different noise), so that an algorithm can compare samples of
      the same prompt (per-prompt advantages); G must divide N. ``reset(options={"shared_noise":
      True})`` also gives the G environments of a prompt one x_T, and ``reset(options={"branch":
      ...})`` restarts them from given latents at a given step (see "Reset options" above).

    All N episodes share the step index, so they end together. One seeded generator draws the
    whole batch: ``reset(seed=s)`` with N = 1 reproduces the single environment's ``reset(seed=s)``.
    Infos are dicts of length-N arrays with Gymnasium's ``"_key"`` masks.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
        array_type: ArrayType = "numpy",
        **options: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r}; allowed: {self.metadata['render_modes']} or None")
        allowed_modes = (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP)
        try:
            autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            autoreset_mode = None
        if autoreset_mode not in allowed_modes:
            raise ValueError(f"autoreset_mode must be one of {[m.value for m in allowed_modes]}")
        if array_type not in ("numpy", "torch"):
            raise ValueError(f"array_type={array_type!r}; allowed: 'numpy' or 'torch'")
        self.core = DenoisingCore(num_envs, **options)
        self.num_envs = self.core.num_envs
        self.render_mode = render_mode
        self.array_type: ArrayType = array_type
        self.metadata = {**self.metadata, "autoreset_mode": autoreset_mode}
        self.single_observation_space = self.core.single_observation_space()
        self.single_action_space = self.core.single_action_space()
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._conditioning: dict[str, np.ndarray] = {}
        self._autoreset_pending = False

    @property
    def autoreset_mode(self) -> AutoresetMode:
        return self.metadata["autoreset_mode"]

    def _output(self, tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
        return tensor if self.array_type == "torch" else _to_numpy(tensor)

    def _observation(self) -> dict[str, np.ndarray | torch.Tensor]:
        if self.array_type == "torch":
            return self.core.observation()
        return {
            "latent": _to_numpy(self.core.latents),
            "timestep": _to_numpy(self.core.timesteps()[:, None]),
            **{key: value.copy() for key, value in self._conditioning.items()},
        }

    def _info(self, result: Any = None) -> dict[str, Any]:
        mask = np.ones(self.num_envs, dtype=bool)
        info: dict[str, Any] = {"prompt": np.array(self.core.prompts, dtype=object), "_prompt": mask}
        if result is not None and result.terminated:
            info["image"], info["_image"] = self._output(result.images), mask
            info["reward_details"] = dict(result.reward_details)
            info["reward_details"].update({f"_{k}": mask for k in result.reward_details})
            info["_reward_details"] = mask
        return info

    def _reset_core(self, options: Mapping[str, Any] | None = None) -> None:
        _reset_core_with(self.core, self.np_random, options, batched=True)
        if self.array_type == "numpy":
            # The conditioning is fixed for the episode: copy it to the host once, not every step.
            self._conditioning = {key: _to_numpy(value) for key, value in self.core.conditioning.items()}
        self._autoreset_pending = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self._reset_core(options)
        return self._observation(), self._info()

    def _action_tensor(self, actions: Any) -> torch.Tensor:
        if self.array_type == "torch":
            return actions
        return _numpy_action(actions, self.action_space, self.core)

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        self.core.require_reset()
        flags = torch.zeros(self.num_envs, dtype=torch.bool, device=self.core.device)
        if self._autoreset_pending:
            # NEXT_STEP: this step only starts the new episodes; the action is ignored.
            self._reset_core()
            rewards = torch.zeros(self.num_envs, device=self.core.device)
            return self._observation(), self._output(rewards), self._output(flags), self._output(flags), self._info()

        result = self.core.step(self._action_tensor(actions))
        terminated = flags | result.terminated
        info = self._info(result)
        if result.terminated and self.autoreset_mode == AutoresetMode.SAME_STEP:
            final_obs = self._observation()
            done = np.ones(self.num_envs, dtype=bool)
            self._reset_core()
            info = {
                **self._info(),
                "final_obs": np.array(
                    [{key: value[i] for key, value in final_obs.items()} for i in range(self.num_envs)],
                    dtype=object,
                ),
                "_final_obs": done,
                "final_info": info,
                "_final_info": done,
            }
        elif result.terminated:
            self._autoreset_pending = True
        return self._observation(), self._output(result.rewards), self._output(terminated), self._output(flags), info

    def render(self) -> tuple[np.ndarray, ...] | None:
        if self.render_mode is None:
            gym.logger.warn("render() was called without a render_mode; pass render_mode='rgb_array'")
            return None
        return tuple(self.core.predicted_clean_images().cpu().numpy())
