"""Rewards paid on the last denoising step, and the registry that names them.

A reward function is any callable

    fn(images, prompts, metadata) -> rewards  or  (rewards, details)

where ``images`` is a uint8 tensor ``(B, H, W, 3)`` on the environment's device, ``prompts`` a list
of B strings, ``metadata`` a list of B dicts (what the prompt set knows about each prompt),
``rewards`` anything ``torch.as_tensor`` turns into B finite numbers, and ``details`` an optional
dict of per-sample figures (each of length B) that the environment reports in ``info``.
The environment calls it once per batch, wrapped in :class:`Reward`, which checks what it returns.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

RewardOutput = Union[Any, tuple[Any, Mapping[str, Any]]]
RewardFn = Callable[[torch.Tensor, Sequence[str], Sequence[Mapping[str, Any]]], RewardOutput]


class RewardError(RuntimeError):
    """A reward function raised, or returned something other than B finite rewards."""


@dataclass(frozen=True)
class RewardResult:
    """Rewards ``(B,)`` float32 on the images' device, and per-sample details (numpy, length B)."""

    rewards: torch.Tensor
    details: dict[str, np.ndarray] = field(default_factory=dict)


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> np.ndarray:
    """Size in kB (1,000 bytes) of each image ``(B, H, W, 3)`` uint8 saved as JPEG at ``quality``."""
    sizes = []
    for pixels in images.cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, dtype=np.float32)


def jpeg_compressibility(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Minus the JPEG size in kB at quality 95 (DDPO paper, Sec. 6.1): smaller files score higher."""
    size = jpeg_size_kb(images)
    return -size, {"jpeg_kb": size}


def jpeg_incompressibility(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The JPEG size in kB at quality 95 (DDPO paper, Sec. 6.1): larger files score higher."""
    size = jpeg_size_kb(images)
    return size, {"jpeg_kb": size}


_REGISTRY: dict[str, RewardFn] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
}


def register(name: str, fn: RewardFn, overwrite: bool = False) -> None:
    """Makes ``fn`` available by ``name`` wherever a reward is named (e.g. ``gym.make(..., reward=name)``).

    Raises:
        ValueError: if ``name`` is taken and ``overwrite`` is False.
        TypeError: if ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = fn


def available_rewards() -> list[str]:
    """The registered reward names."""
    return sorted(_REGISTRY)


class Reward:
    """A reward function with its name, checked on every call.

    Raises (from ``__call__``):
        RewardError: if the function raises, or returns anything but B finite numbers, or details
            whose entries are not of length B.
    """

    def __init__(self, fn: RewardFn, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __repr__(self) -> str:
        return f"Reward({self.name!r})"

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
    ) -> RewardResult:
        batch = images.shape[0]
        try:
            output = self.fn(images, list(prompts), list(metadata))
        except Exception as error:
            raise RewardError(f"reward {self.name!r} raised {type(error).__name__}: {error}") from error
        rewards, details = output if isinstance(output, tuple) and len(output) == 2 else (output, {})
        try:
            values = torch.as_tensor(np.asarray(_to_host(rewards), dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise RewardError(
                f"reward {self.name!r} returned {type(rewards).__name__}, which is not a sequence of "
                f"numbers; allowed: an array or tensor of shape ({batch},)"
            ) from error
        if tuple(values.shape) != (batch,):
            raise RewardError(
                f"reward {self.name!r} returned shape {tuple(values.shape)} for {batch} images; "
                f"allowed: shape ({batch},), one reward per image"
            )
        if not bool(torch.isfinite(values).all()):
            raise RewardError(
                f"reward {self.name!r} returned non-finite values {values.tolist()}; allowed: finite numbers"
            )
        if not isinstance(details, Mapping):
            raise RewardError(f"reward {self.name!r} returned details of type {type(details).__name__}; allowed: a dict")
        checked_details = {}
        for key, value in details.items():
            array = np.asarray(_to_host(value))
            if array.shape[:1] != (batch,):
                raise RewardError(
                    f"reward {self.name!r} detail {key!r} has shape {array.shape}; allowed: length {batch}"
                )
            checked_details[str(key)] = array
        return RewardResult(rewards=values.to(images.device), details=checked_details)


def _to_host(value: Any) -> Any:
    return value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else value


def make_reward(reward: str | RewardFn | Reward) -> Reward:
    """Resolves a registered name, a callable or a :class:`Reward` into a checked :class:`Reward`.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones).
        TypeError: for anything that is neither a string nor callable.
    """
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        if reward not in _REGISTRY:
            raise ValueError(
                f"unknown reward {reward!r}; allowed: {available_rewards()} or a callable "
                "(images, prompts, metadata) -> rewards"
            )
        return Reward(_REGISTRY[reward], name=reward)
    if callable(reward):
        return Reward(reward)
    raise TypeError(
        f"reward must be a registered name {available_rewards()} or a callable, got {type(reward).__name__}"
    )
