"""Rollout collection that overlaps sampling with slow reward evaluation.

Batch k's rewards are computed in an :class:`~diffusion_env.rewards.async_rewards.AsyncRewardEvaluator`'s
worker pool while batch k + 1 is sampled (DDPO, Black et al., 2023, App. B, scores its LLaVA
rewards this way).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import gymnasium as gym
import numpy as np
import torch

from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories, collect_trajectories
from diffusion_env.rewards.async_rewards import AsyncRewardEvaluator, RewardHandle


@dataclasses.dataclass
class ScoredTrajectories:
    """A batch of trajectories with the rewards the evaluator computed for them.

    Attributes:
        trajectories: as :func:`agents.rollouts.collect_trajectories` returns them, with
            ``rewards`` replaced by the evaluator's ``(B,)`` float32 on the policy's device.
        details: the reward's per-sample details (numpy, length B).
    """

    trajectories: Trajectories
    details: dict[str, np.ndarray]


def collect_trajectories_async(
    env: gym.vector.VectorEnv,
    policy: GaussianDenoisingPolicy,
    num_batches: int,
    evaluator: AsyncRewardEvaluator,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    max_in_flight: int | None = None,
) -> list[ScoredTrajectories]:
    """Collects ``num_batches`` batches of trajectories, scoring batch k while batch k + 1 is sampled.

    ``env`` must be a ``DiffusionDenoise`` vector env with ``array_type="torch"`` and
    ``reward=evaluator.env_reward()``. ``seed`` seeds the first reset only; later batches continue
    the environment's generator, as consecutive :func:`collect_trajectories` calls do.

    Args:
        max_in_flight: batches being scored while sampling goes on (default: the evaluator's
            ``max_workers``); older batches are joined first, which bounds memory.

    Returns:
        One :class:`ScoredTrajectories` per batch, in collection order.

    Raises:
        ValueError: if ``env`` does not submit to ``evaluator``, or for ``num_batches`` or
            ``max_in_flight`` < 1.
        RewardError: if scoring a batch failed (the message names the reward and the batch).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    max_in_flight = evaluator.max_workers if max_in_flight is None else max_in_flight
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
    env_reward = getattr(env.unwrapped, "reward", None)
    if getattr(getattr(env_reward, "fn", None), "evaluator", None) is not evaluator:
        raise ValueError(
            "env does not submit its images to this evaluator; allowed: a DiffusionDenoise vector env "
            "made with reward=evaluator.env_reward()"
        )

    pending: deque[tuple[Trajectories, RewardHandle]] = deque()
    scored: list[ScoredTrajectories] = []

    def join_oldest() -> None:
        trajectories, handle = pending.popleft()
        outcome = evaluator.result(handle)
        rewards = outcome.rewards.to(trajectories.rewards.device)
        scored.append(ScoredTrajectories(dataclasses.replace(trajectories, rewards=rewards), outcome.details))

    try:
        for index in range(num_batches):
            trajectories = collect_trajectories(
                env, policy, generator=generator, seed=seed if index == 0 else None
            )
            pending.append((trajectories, evaluator.claim_env_submission()))
            while len(pending) > max_in_flight:
                join_oldest()
        while pending:
            join_oldest()
    finally:
        # After a failure, do not leave queued batches running for nobody.
        for _, handle in pending:
            handle.future.cancel()
    return scored
