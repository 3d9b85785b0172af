"""Asynchronous reward evaluation: slow rewards scored in a worker pool while the next batch samples.

DDPO (Black et al., 2023, Sec. 5 and App. B) computes slow rewards (a LLaVA server for prompt
alignment) asynchronously, so that sampling never waits on scoring. Here the environment keeps
its synchronous contract: on the last step it calls its reward once per batch. The evaluator
gives it a *submitting* reward (:meth:`AsyncRewardEvaluator.env_reward`) that hands the decoded
images to a worker pool and returns zeros at once; the real rewards are joined back later, in
submission order, by :meth:`AsyncRewardEvaluator.result`.

Why a submitting reward rather than re-scoring ``info["image"]`` after each episode: the images
reach the pool the moment they are decoded, on their own device, with the prompts and metadata
the environment drew, and :func:`agents.rollouts.collect_trajectories` runs unchanged (it does not
return infos, and decoding the final latents a second time would cost a VAE pass per batch).

Pipelining (:func:`agents.async_rollouts.collect_trajectories_async`): batch k's rewards are computed while batches
k + 1, ..., k + ``max_in_flight`` are sampled; a batch is joined once that many newer ones are in
flight, which bounds the images held in memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffusion_env.rewards.registry import Reward, RewardError, RewardFn, RewardResult, make_reward


@dataclasses.dataclass(frozen=True)
class RewardHandle:
    """A batch submitted to an :class:`AsyncRewardEvaluator`.

    Attributes:
        index: the batch's submission number (0, 1, ...), used in error messages.
        batch_size: B, the number of images submitted.
        future: the worker's pending :class:`~diffusion_env.rewards.RewardResult`.
    """

    index: int
    batch_size: int
    future: concurrent.futures.Future


class AsyncRewardEvaluator:
    """Scores batches of images with ``reward`` in a pool of worker threads.

    Threads suffice because slow rewards spend their time outside the GIL (torch kernels, PIL
    encoding, network or subprocess waits). Each submitted batch yields exactly its B rewards,
    checked by :class:`~diffusion_env.rewards.Reward`; a worker's failure is re-raised in the
    caller by :meth:`result`.

    Args:
        reward: anything :func:`~diffusion_env.rewards.make_reward` accepts.
        max_workers: worker threads (>= 1).
        executor: a pool to use instead of a new ``ThreadPoolExecutor`` (e.g. a process pool for
            rewards that hold the GIL); it is then not shut down by :meth:`close`.

    Raises:
        ValueError: for ``max_workers`` < 1.
    """

    def __init__(
        self,
        reward: str | RewardFn | Reward,
        max_workers: int = 1,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.reward = make_reward(reward)
        self.max_workers = max_workers
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix=f"reward-{self.reward.name}"
        )
        self._submitted = 0
        # Handles submitted through env_reward(), waiting for agents.async_rollouts.collect_trajectories_async to claim them.
        self._from_env: deque[RewardHandle] = deque()

    def __repr__(self) -> str:
        return f"AsyncRewardEvaluator({self.reward.name!r}, max_workers={self.max_workers})"

    def __enter__(self) -> AsyncRewardEvaluator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Waits for running batches, cancels queued ones, and frees the pool (if it made it)."""
        if self._owns_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> RewardHandle:
        """Queues one batch ``(B, H, W, 3)`` uint8 for scoring; returns at once.

        The images are used in place: do not modify them until :meth:`result` has returned.

        Raises:
            ValueError: if ``images`` is not ``(B, H, W, 3)`` or prompts/metadata are not of length B.
            RuntimeError: if the evaluator was closed.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be a (B, H, W, 3) torch tensor, got {type(images).__name__} of shape "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        batch = images.shape[0]
        if len(prompts) != batch or len(metadata) != batch:
            raise ValueError(
                f"got {batch} images, {len(prompts)} prompts and {len(metadata)} metadata dicts; "
                "allowed: one prompt and one metadata dict per image"
            )
        # Copies of the lists, so that the caller reusing them cannot change a queued batch.
        future = self._executor.submit(self.reward, images, list(prompts), [dict(m) for m in metadata])
        handle = RewardHandle(self._submitted, batch, future)
        self._submitted += 1
        return handle

    def result(self, handle: RewardHandle, timeout: float | None = None) -> RewardResult:
        """Waits for a submitted batch and returns its B rewards and details.

        Raises:
            RewardError: if the worker failed (naming the reward and the batch), or returned other
                than ``handle.batch_size`` rewards.
            TimeoutError: if ``timeout`` seconds pass first.
        """
        try:
            outcome = handle.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise
        except Exception as error:
            raise RewardError(
                f"asynchronous reward {self.reward.name!r} failed on batch {handle.index} "
                f"({handle.batch_size} samples): {error}"
            ) from error
        if outcome.rewards.shape != (handle.batch_size,):
            # Reward checks this already; kept as the guarantee that no sample is silently dropped.
            raise RewardError(
                f"asynchronous reward {self.reward.name!r} returned {tuple(outcome.rewards.shape)} rewards "
                f"for batch {handle.index} of {handle.batch_size} samples; allowed: ({handle.batch_size},)"
            )
        return outcome

    def env_reward(self) -> RewardFn:
        """A reward for the environment (``gym.make_vec(..., reward=evaluator.env_reward())``).

        It submits each batch to this evaluator and pays 0 at once, so the environment's own
        synchronous reward costs nothing; :func:`agents.async_rollouts.collect_trajectories_async` claims the handles.
        """

        def submit_and_pay_zero(
            images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
        ) -> torch.Tensor:
            self._from_env.append(self.submit(images, prompts, metadata))
            return torch.zeros(images.shape[0], device=images.device)

        submit_and_pay_zero.__name__ = f"async_{self.reward.name}"
        submit_and_pay_zero.evaluator = self  # type: ignore[attr-defined]  (how the collector checks the env)
        return submit_and_pay_zero

    def claim_env_submission(self) -> RewardHandle:
        """The oldest batch that :meth:`env_reward` submitted and nobody has claimed yet.

        Raises:
            RuntimeError: if the environment has submitted nothing since the last claim.
        """
        if not self._from_env:
            raise RuntimeError(
                "the environment submitted no batch to this evaluator; make it with "
                "reward=evaluator.env_reward() and run an episode to its last step"
            )
        return self._from_env.popleft()
