"""Rollout collection: whole denoising trajectories from the vector environment, as DDPO trains on.

DDPO (Black et al., 2023, Alg. 1) samples a batch of trajectories with the current policy,
records each step's latent, timestep and log-likelihood, and scores the final images. Training
then recomputes log-likelihoods for (sample, timestep) pairs, batched across both.

The samples of one prompt drawn together form a group (the env's ``samples_per_prompt``), which
GRPO's advantages compare. A group may start from one x_T (``shared_noise``: DanceGRPO) and
share its whole trajectory up to a branch step (``branch_step``: TempFlow-GRPO, BranchGRPO), so
that the reward differences within the group are credited to the steps after the branch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import torch

from agents.policy import GaussianDenoisingPolicy
from diffusion_env.validation import check_int
from agents.step_window import StepWindow
from diffusion_env.samplers import Sampler


@dataclass(frozen=True)
class Outcomes:
    """What a batch of samples ended with, without their latents: what advantages are computed from.

    In a run of several processes the training command gathers every process's outcomes (in
    rank order, groups renumbered so that they stay apart) and computes the advantages of the
    whole batch; each process then trains on its own share.

    Attributes:
        rewards: ``(B,)`` float32, the final rewards.
        groups: ``(B,)`` long, the group of each sample (equal numbers: samples of one prompt drawn together).
        prompts: B prompt strings.
        metadata: the prompts' metadata, as the reward received it.
    """

    rewards: torch.Tensor
    groups: torch.Tensor
    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.rewards.shape[0]


@dataclass
class Trajectories:
    """B trajectories of K steps, on the policy's device.

    Attributes:
        latents: ``(B, K + 1, C, H, W)``: x_T, ..., x_0; step k goes from ``latents[:, k]`` to
            ``latents[:, k + 1]``.
        timesteps: ``(B, K)`` float32, the timestep of each step as the observation held it.
        log_probs: ``(B, K)`` float32, log pi_old(x_{t-1} | x_t, c) when sampled (0 at
            deterministic steps).
        conditioning: the observation's conditioning entries, each ``(B, ...)`` (for the built-in
            model ``"prompt_embedding"`` ``(B, L, D)``).
        prompts: B prompt strings.
        rewards: ``(B,)`` float32, the final reward.
        groups: ``(B,)`` long, the group of each sample: the samples of one prompt drawn together
            (consecutive, numbered from 0 in order).
        images: ``(B, H, W, 3)`` uint8, the decoded final images (``None`` if not kept).
        metadata: the prompts' metadata (e.g. the scene attributes), as the reward received it.
        branch_step: the first step at which the samples of a group may differ; the steps before
            it are the group's shared prefix, which algorithms do not train on (0: no prefix).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    prompts: list[str]
    rewards: torch.Tensor
    groups: torch.Tensor
    images: torch.Tensor | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)
    branch_step: int = 0

    @classmethod
    def concatenate(cls, batches: list[Trajectories]) -> Trajectories:
        """One batch of all the trajectories of ``batches`` (all with the same K, shapes and branch step).

        Group numbers continue from one batch to the next: groups never span two batches.
        """
        branch_steps = {b.branch_step for b in batches}
        if len(branch_steps) > 1:
            raise ValueError(f"the batches have branch steps {sorted(branch_steps)}; allowed: batches of one branch step")
        images = [b.images for b in batches]
        offsets = [0]
        for b in batches[:-1]:
            offsets.append(offsets[-1] + int(b.groups.max()) + 1)
        return cls(
            latents=torch.cat([b.latents for b in batches]),
            timesteps=torch.cat([b.timesteps for b in batches]),
            log_probs=torch.cat([b.log_probs for b in batches]),
            conditioning={key: torch.cat([b.conditioning[key] for b in batches]) for key in batches[0].conditioning},
            prompts=[p for b in batches for p in b.prompts],
            rewards=torch.cat([b.rewards for b in batches]),
            groups=torch.cat([b.groups + offset for b, offset in zip(batches, offsets)]),
            images=None if any(i is None for i in images) else torch.cat(images),
            metadata=[m for b in batches for m in b.metadata],
            branch_step=branch_steps.pop(),
        )

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def outcomes(self) -> Outcomes:
        """The samples' rewards, groups, prompts and metadata."""
        return Outcomes(self.rewards, self.groups, list(self.prompts), list(self.metadata))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def observations(self, samples: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The observations of the (sample, step) pairs ``samples[i], steps[i]``, as the env gives them."""
        return {
            "latent": self.latents[samples, steps],
            "timestep": self.timesteps[samples, steps].to(torch.float32)[:, None],
            **{key: value[samples] for key, value in self.conditioning.items()},
        }

    def actions(self, samples: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The actions x_{t-1} taken at the (sample, step) pairs."""
        return self.latents[samples, steps + 1]

    def trained_steps(self, window: StepWindow, sampler: Sampler) -> torch.Tensor:
        """The steps an algorithm trains on, ``(S,)`` long on the CPU: the window's, from ``branch_step`` on.

        Raises:
            ValueError: if no step of the window lies at or after the branch step.
        """
        steps = window.steps(sampler, self.num_steps)
        trained = steps[steps >= self.branch_step]
        if len(trained) == 0:
            raise ValueError(
                f"the step window holds the steps {steps.tolist()}, all before branch_step={self.branch_step}, "
                "where the samples of a group do not differ yet; allowed: a window or branch step that leaves a step after it"
            )
        return trained

    def minibatches(
        self,
        size: int,
        generator: torch.Generator,
        steps: torch.Tensor | None = None,
        samples: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (sample, step) index pairs in minibatches of ``size``.

        ``samples`` ``(B',)`` are the samples taken (default all); ``steps`` are the steps of
        every one of them ``(S,)`` (default all), or each one's own ``(B', S)``. Mixing timesteps
        inside a minibatch is what lets one network call recompute many log-likelihoods (the
        transition's coefficients are indexed per sample).
        """
        samples = torch.arange(self.batch_size) if samples is None else samples.cpu()
        steps = torch.arange(self.num_steps) if steps is None else steps.cpu()
        steps_grid = steps.expand(len(samples), -1) if steps.dim() == 1 else steps
        samples_grid = samples[:, None].expand_as(steps_grid)
        pairs = torch.stack([samples_grid.reshape(-1), steps_grid.reshape(-1)], dim=1)
        pairs = pairs[torch.randperm(len(pairs), generator=generator)].to(self.latents.device)
        for start in range(0, len(pairs), size):
            chunk = pairs[start : start + size]
            yield chunk[:, 0], chunk[:, 1]


@torch.no_grad()
def collect_trajectories(
    env: gym.vector.VectorEnv,
    policy: GaussianDenoisingPolicy,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    *,
    shared_noise: bool = False,
    branch_step: int = 0,
) -> Trajectories:
    """Resets ``env`` (a ``DiffusionDenoise`` vector env) and runs its N episodes with ``policy``.

    The env must use ``array_type="torch"``, so that nothing leaves the device. A group is the
    env's ``samples_per_prompt`` consecutive episodes of one prompt.

    Args:
        shared_noise: the episodes of a group start from one x_T (the env's ``shared_noise``
            reset option; DanceGRPO, Xue et al., 2025).
        branch_step: the episodes of a group also share their actions before this step: the
            policy samples one trajectory per group up to it (one network call per group), and
            the group branches there (TempFlow-GRPO, He et al., 2025; BranchGRPO, Li et al.,
            2025). Needs ``shared_noise``. 0: no shared prefix.

    Raises:
        ValueError: for an env that is not a torch ``DiffusionDenoise`` vector env, a branch step
            outside ``[0, K)``, or one > 0 without ``shared_noise``.
    """
    unwrapped = env.unwrapped
    if getattr(unwrapped, "array_type", None) != "torch":
        raise ValueError(
            "collect_trajectories needs a DiffusionDenoise vector env made with array_type='torch'"
        )
    num_steps = unwrapped.num_inference_steps
    branch_step = check_int("branch_step", branch_step, 0, num_steps - 1)  # a step before the env's last
    if branch_step > 0 and not shared_noise:
        raise ValueError(
            f"branch_step={branch_step} without shared_noise: a group shares its trajectory up to the branch, "
            "x_T included; allowed: shared_noise=True, or branch_step=0"
        )
    obs, _ = env.reset(seed=seed, options={"shared_noise": True} if shared_noise else None)
    prompts, metadata = unwrapped.prompts, unwrapped.prompt_metadata
    group_size = unwrapped.samples_per_prompt
    groups = torch.arange(unwrapped.num_envs, device=obs["latent"].device) // group_size
    # The first episode of each group samples the group's shared prefix.
    leaders = torch.arange(0, unwrapped.num_envs, group_size, device=obs["latent"].device)
    conditioning = {key: obs[key] for key in unwrapped.conditioning_keys}
    latents, timesteps, log_probs = [obs["latent"]], [], []
    for step in range(num_steps):
        timesteps.append(obs["timestep"][:, 0])
        if step < branch_step:
            action, log_prob = policy.sample_with_log_prob({key: value[leaders] for key, value in obs.items()}, generator=generator)
            action, log_prob = action.repeat_interleave(group_size, dim=0), log_prob.repeat_interleave(group_size, dim=0)
        else:
            action, log_prob = policy.sample_with_log_prob(obs, generator=generator)
        obs, rewards, _, _, info = env.step(action)
        latents.append(action)
        log_probs.append(log_prob)
    return Trajectories(
        latents=torch.stack(latents, dim=1),
        timesteps=torch.stack(timesteps, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        conditioning=conditioning,
        prompts=prompts,
        rewards=rewards,
        groups=groups,
        images=info["image"],
        metadata=metadata,
        branch_step=branch_step,
    )
