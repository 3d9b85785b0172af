"""Reward throughput on CPU, and the wall time saved by scoring asynchronously during collection.

1. Images per second of each offline reward on a batch of rendered scenes (median of repeats).
2. DDPO-style collection of several batches on the test-sized model with a deliberately slow
   reward (a sleep per batch, standing in for a remote or large scorer): synchronously, where
   every batch waits for its reward, against :func:`collect_trajectories_async`, where batch k is
   scored while batch k + 1 is sampled. With sampling time S and reward time R per batch, the
   ideal is n (S + R) against n max(S, R) + min(S, R).

    OMP_NUM_THREADS=1 python benchmarks/reward_throughput.py --batch-size 64 --batches 4 --delay 0.5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import GaussianDenoisingPolicy
from agents.async_rollouts import collect_trajectories_async
from agents.rollouts import collect_trajectories
from diffusion_env.rewards import RewardFn, make_reward
from diffusion_env.rewards.async_rewards import AsyncRewardEvaluator
from diffusion_env.shapes import scenes

# prompt_alignment repeats the same batch, so it is timed with its text embeddings cached (as for
# RL prompts, which recur); the scene parser then bounds it.
OFFLINE_REWARDS = (
    "jpeg_compressibility", "jpeg_incompressibility", "colorfulness", "scene_alignment", "prompt_alignment"
)


def scene_batch(batch_size: int, size: int, seed: int) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Rendered scenes ``(B, size, size, 3)`` uint8 with their captions and metadata."""
    rng = np.random.default_rng(seed)
    drawn = [scenes.sample_scene(rng) for _ in range(batch_size)]
    images = np.stack([scenes.render_scene(scene, size=size) for scene in drawn])
    return torch.from_numpy(images), [scenes.caption(s) for s in drawn], [s.metadata for s in drawn]


def reward_images_per_second(name: str, batch_size: int, size: int, repeats: int) -> float:
    """Median images/s of the registered reward ``name`` over ``repeats`` calls (after one warm-up)."""
    reward = make_reward(name)
    images, prompts, metadata = scene_batch(batch_size, size, seed=0)
    reward(images, prompts, metadata)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reward(images, prompts, metadata)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def slow_reward(delay: float) -> RewardFn:
    """JPEG compressibility after sleeping ``delay`` seconds per batch (a stand-in for a slow scorer)."""
    jpeg = make_reward("jpeg_compressibility")

    def slow_jpeg_compressibility(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        time.sleep(delay)
        return jpeg(images, prompts, metadata).rewards

    return slow_jpeg_compressibility


def make_env(reward: str | RewardFn, batch_size: int, steps: int) -> gym.vector.VectorEnv:
    """The collection environment of part 2: the test-sized model, stepped in torch."""
    return gym.make_vec(
        "DiffusionDenoise-v0",
        num_envs=batch_size,
        model="tiny-random",
        reward=reward,
        num_inference_steps=steps,
        array_type="torch",
    )


def time_sync(reward: RewardFn, batch_size: int, steps: int, batches: int) -> float:
    """Seconds to collect ``batches`` batches, each waiting for its own ``reward``."""
    env = make_env(reward, batch_size, steps)
    policy = GaussianDenoisingPolicy.from_env(env)
    start = time.perf_counter()
    for index in range(batches):
        collect_trajectories(env, policy, seed=0 if index == 0 else None)
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed


def time_async(batch_size: int, steps: int, batches: int, delay: float) -> float:
    """Seconds to collect ``batches`` batches with rewards scored in a worker thread."""
    with AsyncRewardEvaluator(slow_reward(delay), max_workers=1) as evaluator:
        env = make_env(evaluator.env_reward(), batch_size, steps)
        policy = GaussianDenoisingPolicy.from_env(env)
        start = time.perf_counter()
        scored = collect_trajectories_async(env, policy, batches, evaluator, seed=0)
        elapsed = time.perf_counter() - start
        env.close()
    if len(scored) != batches:
        raise RuntimeError(f"asynchronous collection returned {len(scored)} batches, expected {batches}")
    return elapsed


def aesthetic_images_per_second(batch_size: int, size: int) -> float:
    """Images/s of the aesthetic scorer on a randomly initialised CLIP ViT-L/14 (the real model's
    architecture and cost; its weights cannot be downloaded here, and the speed does not depend on them)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffusion_env.rewards.aesthetic import AestheticMLP, AestheticScorer

    config = CLIPConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14, image_size=224),
        text_config=dict(num_hidden_layers=1),  # unused by the image embedding
        projection_dim=768,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    scorer = AestheticScorer(CLIPModel(config).eval(), processor, AestheticMLP(768), batch_size=batch_size)
    images, prompts, metadata = scene_batch(batch_size, size, seed=0)
    scorer(images, prompts, metadata)
    start = time.perf_counter()
    scorer(images, prompts, metadata)
    return batch_size / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32, help="side of the rendered scenes for part 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per episode in part 2")
    parser.add_argument("--batches", type=int, default=4, help="collection batches in part 2")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the slow reward sleeps per batch")
    parser.add_argument(
        "--skip-aesthetic", action="store_true", help="leave out the aesthetic scorer (a 0.3 B-parameter CLIP built in memory)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    print(f"offline rewards, CPU, batch {args.batch_size} of {args.image_size}x{args.image_size} scenes "
          f"(torch threads: {torch.get_num_threads()})")
    for name in OFFLINE_REWARDS:
        rate = reward_images_per_second(name, args.batch_size, args.image_size, args.repeats)
        print(f"  {name:24s} {rate:12,.0f} images/s")
    if not args.skip_aesthetic:
        aesthetic_batch = min(args.batch_size, 16)
        rate = aesthetic_images_per_second(aesthetic_batch, args.image_size)
        print(f"  {'aesthetic (ViT-L/14)':24s} {rate:12,.1f} images/s (batch {aesthetic_batch}, random weights)")

    print(f"\ncollection of {args.batches} batches x {args.batch_size} samples x {args.steps} steps, "
          f"model tiny-random, reward sleeping {args.delay} s per batch")
    free_reward = lambda images, prompts, metadata: np.zeros(len(prompts))  # noqa: E731
    sampling = time_sync(free_reward, args.batch_size, args.steps, args.batches)
    synchronous = time_sync(slow_reward(args.delay), args.batch_size, args.steps, args.batches)
    asynchronous = time_async(args.batch_size, args.steps, args.batches, args.delay)
    per_batch = sampling / args.batches
    ideal = args.batches * max(per_batch, args.delay) + min(per_batch, args.delay)
    print(f"  sampling alone     {sampling:7.2f} s ({per_batch:.2f} s per batch)")
    print(f"  synchronous        {synchronous:7.2f} s")
    print(f"  asynchronous       {asynchronous:7.2f} s (ideal {ideal:.2f} s)")
    print(f"  saved              {synchronous - asynchronous:7.2f} s ({1 - asynchronous / synchronous:.0%})")


if __name__ == "__main__":
    main()
