"""Asynchronous rewards: overlap with sampling, order, errors, and no dropped samples."""

import threading

import numpy as np
import pytest
import torch

from agents import GaussianDenoisingPolicy
from agents.async_rollouts import collect_trajectories_async
from diffusion_env.rewards.async_rewards import AsyncRewardEvaluator
from diffusion_env.rewards import RewardError


def mean_pixel(images, prompts, metadata):
    """Encodes each image by its mean pixel value, so a reward can be matched to its image."""
    values = images.float().mean(dim=(1, 2, 3))
    return values, {"prompt_length": np.array([len(p) for p in prompts])}


class RecordingPolicy:
    """Delegates to a policy and records when each batch's sampling starts."""

    def __init__(self, policy, events, started):
        self.policy, self.events, self.started = policy, events, started
        self.batches = 0

    def sample_with_log_prob(self, obs, generator=None):
        if int(obs["timestep"][0]) == int(self.policy.sampler.timesteps[0]):  # first step of a batch
            self.events.append(("sample_start", self.batches))
            self.started[self.batches].set()
            self.batches += 1
        return self.policy.sample_with_log_prob(obs, generator=generator)


def test_batch_k_is_scored_while_batch_k_plus_1_is_sampled(make_vec_env):
    num_batches = 3
    events = []
    started = [threading.Event() for _ in range(num_batches + 1)]
    calls = []

    def waits_for_the_next_batch(images, prompts, metadata):
        # Blocks until the next batch's sampling has begun: without overlap this would time out,
        # so the recorded order, not wall-clock speed, proves the pipelining.
        batch = len(calls)
        calls.append(batch)
        events.append(("reward_start", batch))
        overlapped = started[batch + 1].wait(timeout=30) if batch + 1 < num_batches else True
        events.append(("reward_end", batch))
        return torch.full((images.shape[0],), float(overlapped))

    with AsyncRewardEvaluator(waits_for_the_next_batch, max_workers=1) as evaluator:
        env = make_vec_env(num_envs=2, array_type="torch", reward=evaluator.env_reward())
        policy = RecordingPolicy(GaussianDenoisingPolicy.from_env(env), events, started)
        scored = collect_trajectories_async(env, policy, num_batches, evaluator, seed=0)
    assert [float(s.trajectories.rewards.min()) for s in scored] == [1.0, 1.0, 1.0]
    for batch in range(num_batches - 1):
        assert events.index(("sample_start", batch + 1)) < events.index(("reward_end", batch))
        assert events.index(("sample_start", batch)) < events.index(("reward_start", batch))


def test_rewards_are_matched_to_their_samples_and_none_is_dropped(make_vec_env):
    seen = []

    def recording_mean_pixel(images, prompts, metadata):
        seen.append(images.clone())
        return mean_pixel(images, prompts, metadata)

    with AsyncRewardEvaluator(recording_mean_pixel, max_workers=2) as evaluator:
        env = make_vec_env(num_envs=3, array_type="torch", reward=evaluator.env_reward())
        policy = GaussianDenoisingPolicy.from_env(env)
        generator = torch.Generator().manual_seed(0)
        scored = collect_trajectories_async(env, policy, 4, evaluator, generator=generator, seed=1)
        core = env.unwrapped.core
    assert len(scored) == 4
    for batch in scored:
        # Recompute each image from the trajectory's own final latents: the reward must be its mean pixel.
        images = core.backend.decode(batch.trajectories.latents[:, -1])
        torch.testing.assert_close(batch.trajectories.rewards, images.float().mean(dim=(1, 2, 3)))
        assert batch.trajectories.rewards.shape == (3,)
        np.testing.assert_array_equal(batch.details["prompt_length"], [len(p) for p in batch.trajectories.prompts])
    assert len(seen) == 4


def test_submit_and_result_keep_order_across_many_workers():
    def slow_then_fast(images, prompts, metadata):
        # Earlier batches finish later: results must still come back per handle, in order.
        threading.Event().wait(0.02 * (5 - int(images[0, 0, 0, 0])))
        return mean_pixel(images, prompts, metadata)

    with AsyncRewardEvaluator(slow_then_fast, max_workers=4) as evaluator:
        batches = [torch.full((k + 1, 4, 4, 3), k, dtype=torch.uint8) for k in range(5)]
        handles = [evaluator.submit(images, ["p"] * len(images), [{}] * len(images)) for images in batches]
        results = [evaluator.result(handle) for handle in handles]
    for k, result in enumerate(results):
        torch.testing.assert_close(result.rewards, torch.full((k + 1,), float(k)))
    assert [h.index for h in handles] == [0, 1, 2, 3, 4]


def test_a_worker_that_raises_surfaces_in_the_caller_naming_reward_and_batch(make_vec_env):
    calls = []

    def fails_on_the_second_batch(images, prompts, metadata):
        calls.append(None)
        if len(calls) == 2:
            raise OSError("scoring server unreachable")
        return np.zeros(images.shape[0])

    with AsyncRewardEvaluator(fails_on_the_second_batch) as evaluator:
        env = make_vec_env(num_envs=2, array_type="torch", reward=evaluator.env_reward())
        policy = GaussianDenoisingPolicy.from_env(env)
        with pytest.raises(
            RewardError,
            match=r"asynchronous reward 'fails_on_the_second_batch' failed on batch 1 \(2 samples\): .*OSError: "
            "scoring server unreachable",
        ):
            collect_trajectories_async(env, policy, 3, evaluator, seed=0)


def test_wrong_sized_rewards_and_bad_inputs_are_refused():
    with AsyncRewardEvaluator(lambda images, prompts, metadata: np.zeros(1), max_workers=1) as evaluator:
        handle = evaluator.submit(torch.zeros((2, 4, 4, 3), dtype=torch.uint8), ["a", "b"], [{}, {}])
        with pytest.raises(RewardError, match=r"failed on batch 0 \(2 samples\).*allowed: shape \(2,\)"):
            evaluator.result(handle)
        with pytest.raises(ValueError, match="one prompt and one metadata dict per image"):
            evaluator.submit(torch.zeros((2, 4, 4, 3), dtype=torch.uint8), ["a"], [{}, {}])
    with pytest.raises(ValueError, match="max_workers must be an int >= 1"):
        AsyncRewardEvaluator("colorfulness", max_workers=0)


def test_the_env_must_submit_to_the_evaluator(make_vec_env):
    env = make_vec_env(num_envs=2, array_type="torch")
    with AsyncRewardEvaluator("colorfulness") as evaluator:
        with pytest.raises(ValueError, match=r"made with reward=evaluator.env_reward\(\)"):
            collect_trajectories_async(env, GaussianDenoisingPolicy.from_env(env), 1, evaluator)
