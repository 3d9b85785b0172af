"""Rollout collection: whole denoising trajectories from the vector environment, as DDPO trains on.

DDPO (Black et al., 2023, Alg. 1) samples a batch of trajectories with the current policy,
records each step's latent, timestep and log-likelihood, and scores the final images. Training
then recomputes log-likelihoods for (sample, timestep) pairs, batched across both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import torch

from agents.policy import GaussianDenoisingPolicy


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
        images: ``(B, H, W, 3)`` uint8, the decoded final images (``None`` if not kept).
        metadata: the prompts' metadata (e.g. the scene attributes), as the reward received it.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    prompts: list[str]
    rewards: torch.Tensor
    images: torch.Tensor | None = None
    metadata: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def concatenate(cls, batches: list[Trajectories]) -> Trajectories:
        """One batch of all the trajectories of ``batches`` (all with the same K and shapes)."""
        images = [b.images for b in batches]
        return cls(
            latents=torch.cat([b.latents for b in batches]),
            timesteps=torch.cat([b.timesteps for b in batches]),
            log_probs=torch.cat([b.log_probs for b in batches]),
            conditioning={key: torch.cat([b.conditioning[key] for b in batches]) for key in batches[0].conditioning},
            prompts=[p for b in batches for p in b.prompts],
            rewards=torch.cat([b.rewards for b in batches]),
            images=None if any(i is None for i in images) else torch.cat(images),
            metadata=[m for b in batches for m in b.metadata],
        )

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

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

    def minibatches(
        self, size: int, generator: torch.Generator, steps: torch.Tensor | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (sample, step) index pairs in minibatches of ``size``, over every sample and the given steps.

        Mixing timesteps inside a minibatch is what lets one network call recompute many
        log-likelihoods (the transition's coefficients are indexed per sample).
        """
        steps = torch.arange(self.num_steps) if steps is None else steps.cpu()
        samples_grid, steps_grid = torch.meshgrid(torch.arange(self.batch_size), steps, indexing="ij")
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
) -> Trajectories:
    """Resets ``env`` (a ``DiffusionDenoise`` vector env) and runs its N episodes with ``policy``.

    The env must use ``array_type="torch"``, so that nothing leaves the device.
    """
    if getattr(env.unwrapped, "array_type", None) != "torch":
        raise ValueError(
            "collect_trajectories needs a DiffusionDenoise vector env made with array_type='torch'"
        )
    obs, _ = env.reset(seed=seed)
    prompts, metadata = env.unwrapped.prompts, env.unwrapped.prompt_metadata
    conditioning = {key: obs[key] for key in env.unwrapped.conditioning_keys}
    latents, timesteps, log_probs = [obs["latent"]], [], []
    for _ in range(env.unwrapped.num_inference_steps):
        timesteps.append(obs["timestep"][:, 0])
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
        images=info["image"],
        metadata=metadata,
    )
