"""Rewards paid on the last denoising step: the registry, the built-in rewards and their combinations.

See :mod:`diffusion_env.rewards.registry` for the reward-function contract. The learned rewards
(:mod:`~diffusion_env.rewards.aesthetic`, :mod:`~diffusion_env.rewards.prompt_alignment`) load
their models on first use; :mod:`~diffusion_env.rewards.async_rewards` scores slow rewards in a
worker pool. The built-in world registers its own rewards (``scene_alignment``, ``prompt_alignment``).
"""

from diffusion_env.rewards.registry import (
    CombinedReward,
    Reward,
    RewardError,
    RewardFn,
    RewardResult,
    available_rewards,
    colorfulness,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
    make_reward,
    parse_combination,
    register_factory,
    register_reward,
)

__all__ = [
    "CombinedReward",
    "Reward",
    "RewardError",
    "RewardFn",
    "RewardResult",
    "available_rewards",
    "colorfulness",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "make_reward",
    "parse_combination",
    "register_factory",
    "register_reward",
]
