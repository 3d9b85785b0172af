"""Advantages: rewards normalised per prompt or per batch (DDPO), or within groups (GRPO), then clipped.

DDPO (Black et al., 2023, App. A) normalises each reward with the mean and standard deviation of
recent rewards *for the same prompt*, so that prompts that are easy or hard to score do not
dominate the gradient; until a prompt has been seen often enough it falls back to the statistics
of the whole batch. GRPO (Shao et al., 2024) compares each sample only with the other samples of
its prompt drawn in the same batch (its group), with no running statistics.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

_EPSILON = 1e-6


def batch_normalized_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(r - mean(r)) / (std(r) + 1e-6) over the batch."""
    rewards = rewards.to(torch.float32)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + _EPSILON)


def group_relative_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, scale: Literal["group", "batch"] = "group"
) -> torch.Tensor:
    """GRPO's advantages (Shao et al., 2024, Sec. 4.1.2): each reward minus its group's mean, divided by a std.

    ``groups`` ``(B,)`` names each sample's group (any integers: equal ones form a group).
    ``scale="group"`` divides by the group's standard deviation, as GRPO does; ``"batch"`` by the
    whole batch's, which keeps a group whose rewards barely differ from having its noise blown
    up to unit scale (the group-std bias that Liu et al., 2025, "Understanding R1-Zero-Like
    Training", point out). Population standard deviations, plus 1e-6. A group whose rewards are
    all equal gets advantages 0.
    """
    if scale not in ("group", "batch"):
        raise ValueError(f"scale={scale!r}; allowed: 'group' or 'batch'")
    if groups.shape != rewards.shape:
        raise ValueError(f"groups have shape {tuple(groups.shape)}; allowed: one per reward, {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float32)
    _, index = torch.unique(groups, return_inverse=True)
    index = index.to(rewards.device)
    count = torch.zeros(int(index.max()) + 1, device=rewards.device).index_add_(0, index, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    if scale == "batch":
        return centred / (rewards.std(unbiased=False) + _EPSILON)
    std = (torch.zeros_like(count).index_add_(0, index, centred.square()) / count).sqrt()
    return centred / (std[index] + _EPSILON)


def groups_with_spread(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per sample ``(B,)`` bool: whether the rewards of its group are not all equal.

    A group of equal rewards (or of one sample) has no relative signal; GRPO variants leave it out
    of the update (DAPO's dynamic sampling: Yu et al., 2025).
    """
    _, index = torch.unique(groups, return_inverse=True)
    index = index.to(rewards.device)
    size = int(index.max()) + 1
    high = torch.full((size,), -math.inf, device=rewards.device).scatter_reduce(0, index, rewards.float(), "amax")
    low = torch.full((size,), math.inf, device=rewards.device).scatter_reduce(0, index, rewards.float(), "amin")
    return (high > low)[index]


def clip_advantages(advantages: torch.Tensor, max_abs: float) -> torch.Tensor:
    """Advantages clipped to [-max_abs, max_abs] (DDPO's ``adv_clip_max``)."""
    if not max_abs > 0:
        raise ValueError(f"advantage clip must be > 0, got {max_abs}")
    return advantages.clamp(-max_abs, max_abs)


class PerPromptStatTracker:
    """Running per-prompt reward statistics.

    Args:
        buffer_size: rewards kept per prompt (the most recent ones).
        min_count: below this many rewards for a prompt, the batch's statistics are used.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"need buffer_size >= 1 and 1 <= min_count <= buffer_size, got {buffer_size}, {min_count}"
            )
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Adds the batch to the buffers and returns its advantages ``(B,)`` on the rewards' device."""
        values = rewards.detach().to(torch.float64).cpu().numpy()
        if len(prompts) != len(values):
            raise ValueError(f"got {len(prompts)} prompts for {len(values)} rewards; allowed: one per reward")
        batch_mean, batch_std = values.mean(), values.std()
        advantages = np.empty_like(values)
        prompt_array = np.asarray(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[mask] = (values[mask] - mean) / (std + _EPSILON)
        return torch.as_tensor(advantages, dtype=torch.float32, device=rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(state["buffer_size"], state["min_count"])
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}
