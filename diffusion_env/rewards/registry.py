"""Rewards paid on the last denoising step, and the registry that names them.

A reward function is any callable

    fn(images, prompts, metadata) -> rewards  or  (rewards, details)

where ``images`` is a uint8 tensor ``(B, H, W, 3)`` on the environment's device, ``prompts`` a list
of B strings, ``metadata`` a list of B dicts (what the prompt set knows about each prompt),
``rewards`` anything ``torch.as_tensor`` turns into B finite numbers, and ``details`` an optional
dict of per-sample figures (each of length B) that the environment reports in ``info``.
The environment calls it once per batch, wrapped in :class:`Reward`, which checks what it returns.

Rewards are named in a registry (:func:`register`, :func:`register_factory` for rewards that load a
model on first use, :func:`available_rewards`) and resolved by :func:`make_reward`, which also
reads weighted combinations such as ``"jpeg_compressibility+0.5*colorfulness"``.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from diffusion_env.registry import Registry

RewardOutput = Union[Any, tuple[Any, Mapping[str, Any]]]
RewardFn = Callable[[torch.Tensor, Sequence[str], Sequence[Mapping[str, Any]]], RewardOutput]


class RewardError(RuntimeError):
    """A reward function raised, or returned something other than B finite rewards."""


@dataclass(frozen=True)
class RewardResult:
    """Rewards ``(B,)`` float32 on the images' device, and per-sample details (numpy, length B)."""

    rewards: torch.Tensor
    details: dict[str, np.ndarray] = field(default_factory=dict)

    def detail_means(self) -> dict[str, float]:
        """Each detail's mean over the samples where it is defined (finite), e.g. ``scene_count``
        only over prompts that name a count; a detail defined for no sample is left out."""
        means = {}
        for key, values in self.details.items():
            defined = values[np.isfinite(values)]
            if defined.size:
                means[key] = float(defined.mean())
        return means


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


def colorfulness(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The colourfulness metric M of Hasler and Suesstrunk (2003), "Measuring colourfulness in natural images".

    With rg = R - G and yb = (R + G) / 2 - B over the pixels (0..255 scale),
    M = sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2); a grey image scores 0.
    Computed in torch on the images' device, so a GPU batch is never copied to the host.
    """
    pixels = images.to(torch.float32).flatten(1, 2)  # (B, H*W, 3)
    red, green, blue = pixels.unbind(dim=-1)
    rg = red - green
    yb = (red + green) / 2 - blue
    # Population standard deviation (divide by N), as the paper's statistics over all pixels.
    spread = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    offset = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return spread + 0.3 * offset, {"colorfulness_spread": spread, "colorfulness_offset": offset}


_COMBINATION_OPERATORS = re.compile(r"[+*]|-")

#: How a reward string that names a reward server (:mod:`~diffusion_env.rewards.remote`) starts.
REWARD_URL_SCHEMES = ("http://", "https://")


def _check_reward_name(name: str) -> None:
    if _COMBINATION_OPERATORS.search(name):
        raise ValueError(
            f"reward name {name!r} contains '+', '-' or '*', which make_reward reads as a combination; "
            "allowed: letters, digits, '_' and '.'"
        )


class LazyReward:
    """A registered reward that ``factory()`` builds the first time its name is resolved.

    For rewards that load models or weights, so that registering them (at import) costs nothing;
    the built reward replaces this entry, so the model loads once per process. A factory that
    fails leaves the entry in place, so that a later resolution tries again.
    """

    def __init__(self, factory: Callable[[], RewardFn]) -> None:
        self.factory = factory

    def build(self) -> RewardFn:
        """The reward ``factory()`` builds (checked to be callable)."""
        built = self.factory()
        if not callable(built):
            raise TypeError(f"the factory {self.factory!r} returned {type(built).__name__}; allowed: a callable reward")
        return built

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> RewardOutput:
        return self.build()(images, prompts, metadata)


#: The registered rewards; lazily built ones are :class:`LazyReward` entries until first use.
REWARDS: Registry[RewardFn] = Registry(
    "reward",
    {
        "jpeg_compressibility": jpeg_compressibility,
        "jpeg_incompressibility": jpeg_incompressibility,
        "colorfulness": colorfulness,
    },
    check_name=_check_reward_name,
)


def register_reward(name: str, fn: RewardFn, overwrite: bool = False) -> None:
    """Makes ``fn`` available by ``name`` wherever a reward is named (e.g. ``gym.make(..., reward=name)``).

    Raises:
        ValueError: if ``name`` is taken and ``overwrite`` is False, or contains ``+ - *``.
        TypeError: if ``fn`` is not callable.
    """
    REWARDS.register(name, fn, overwrite)


def register_factory(name: str, factory: Callable[[], RewardFn], overwrite: bool = False) -> None:
    """Registers ``name`` for a reward that ``factory()`` builds the first time the name is resolved
    (see :class:`LazyReward`); raises as :func:`register_reward`."""
    if not callable(factory):
        raise TypeError(f"factory of reward {name!r} must be callable, got {type(factory).__name__}")
    REWARDS.register(name, LazyReward(factory), overwrite)


def _aesthetic() -> RewardFn:
    """Builds the LAION aesthetic reward (DDPO, Black et al., 2023, Sec. 6.1) from its configured weights."""
    # Imported on first use, so that importing the package loads neither transformers nor a model.
    from diffusion_env.rewards.aesthetic import aesthetic_from_environment

    return aesthetic_from_environment()


#: The image-to-text model of ``prompt_alignment_vlm``: a local folder or hub id (BLIP by default).
CAPTIONER_ENV_VAR = "DIFFUSION_ENV_CAPTIONER"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"


def _prompt_alignment_vlm() -> RewardFn:
    """DDPO's prompt-alignment reward (Black et al., 2023, Sec. 6.3) with a transformers captioner:
    the model ``$DIFFUSION_ENV_CAPTIONER`` names (default BLIP), asked DDPO's question."""
    import os

    from diffusion_env.rewards.prompt_alignment import PromptAlignmentReward, TransformersCaptioner

    return PromptAlignmentReward(TransformersCaptioner.from_pretrained(os.environ.get(CAPTIONER_ENV_VAR, DEFAULT_CAPTIONER)))


def available_rewards() -> list[str]:
    """The registered reward names (built-in, registered and lazily built ones)."""
    return REWARDS.names()


def _registered(name: str) -> RewardFn:
    """The reward registered as ``name``, built now if it was registered with a factory."""
    entry = REWARDS.get(
        name,
        ", a weighted combination such as 'jpeg_compressibility+0.5*colorfulness', a reward server's "
        "URL 'http://host:port', or a callable (images, prompts, metadata) -> rewards",
    )
    if isinstance(entry, LazyReward):
        entry = entry.build()
        REWARDS.register(name, entry, overwrite=True)
    return entry


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


_FLOAT = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(
    rf"\s*(?P<sign>[+-])?\s*(?:(?P<weight>{_FLOAT})\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\s*"
)

RewardTerm = tuple[Union[str, RewardFn, "Reward"], float]


def parse_combination(expression: str) -> list[tuple[str, float]]:
    """Reads ``"jpeg_compressibility+0.5*colorfulness-2e-1*scene_alignment"`` into (name, weight) terms.

    Grammar: terms separated by ``+`` or ``-`` (the first may carry a sign), each ``name`` or
    ``<float>*name``, with spaces allowed around operators; names are not checked here.

    Raises:
        ValueError: naming the position and the text that does not fit the grammar.
    """
    terms: list[tuple[str, float]] = []
    position = 0
    while position < len(expression):
        match = _TERM.match(expression, position)
        if match is None or (terms and match.group("sign") is None):
            rest = expression[position:].strip() or "(end)"
            expected = "'+' or '-' and a term" if terms else "a term"
            raise ValueError(
                f"cannot read reward combination {expression!r} at character {position} ({rest!r}); "
                f"expected {expected}; allowed: terms 'name' or '<float>*name' joined by '+' or '-', "
                "e.g. 'jpeg_compressibility+0.5*colorfulness'"
            )
        weight = float(match.group("weight")) if match.group("weight") else 1.0
        terms.append((match.group("name"), -weight if match.group("sign") == "-" else weight))
        position = match.end()
    if not terms:
        raise ValueError(
            f"reward combination {expression!r} is empty; allowed: e.g. 'jpeg_compressibility+0.5*colorfulness'"
        )
    return terms


class CombinedReward:
    """A weighted sum of rewards, r = sum_i w_i r_i, each component checked by :class:`Reward`.

    Weighted sums of several reward models are the usual way to trade objectives off in reward
    fine-tuning (e.g. Fan et al., 2023, DPOK; Clark et al., 2024, DRaFT). The details hold each
    component's reward under its name and the component's own details as ``"<name>/<key>"`` (so
    that two components reporting the same key cannot overwrite each other).

    Raises:
        ValueError: for no terms, a non-finite weight, or a component named twice.
    """

    def __init__(self, terms: Sequence[RewardTerm]) -> None:
        if len(terms) == 0:
            raise ValueError("a reward combination needs at least one (reward, weight) term")
        self.components: list[tuple[Reward, float]] = []
        for term in terms:
            if not isinstance(term, tuple) or len(term) != 2:
                raise ValueError(f"reward combination term {term!r} is not a pair; allowed: (name_or_callable, weight)")
            reward, weight = make_reward(term[0]), term[1]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward {reward.name!r} is {weight!r}; allowed: a finite number")
            if any(reward.name == seen.name for seen, _ in self.components):
                raise ValueError(
                    f"reward {reward.name!r} appears twice in the combination; allowed: each once "
                    "(add the weights into one term)"
                )
            self.components.append((reward, float(weight)))
        self.__name__ = "+".join(f"{weight:g}*{reward.name}" for reward, weight in self.components).replace("+-", "-")

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        details: dict[str, np.ndarray] = {}
        for reward, weight in self.components:
            result = reward(images, prompts, metadata)
            total = total + weight * result.rewards
            details[reward.name] = result.rewards.cpu().numpy()
            details.update({f"{reward.name}/{key}": value for key, value in result.details.items()})
        return total, details


def make_reward(reward: str | RewardFn | Reward | Sequence[RewardTerm]) -> Reward:
    """Resolves a reward into a checked :class:`Reward`.

    Accepts a registered name, a weighted combination of registered names
    (``"jpeg_compressibility+0.5*colorfulness"``, see :func:`parse_combination`), a reward
    server's URL (``"http://127.0.0.1:8000"``, see :class:`~diffusion_env.rewards.remote.RemoteReward`),
    a list of ``(name_or_callable, weight)`` pairs, a callable or a :class:`Reward`.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones) or a combination
            that does not parse.
        TypeError: for anything else.
    """
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        if reward.startswith(REWARD_URL_SCHEMES):
            # Imported here: the client module imports this one.
            from diffusion_env.rewards.remote import RemoteReward

            return Reward(RemoteReward(reward), name=reward)
        if reward not in REWARDS and _COMBINATION_OPERATORS.search(reward):
            return Reward(CombinedReward(parse_combination(reward)), name=reward.replace(" ", ""))
        return Reward(_registered(reward), name=reward)
    if callable(reward):
        return Reward(reward)
    if isinstance(reward, (list, tuple)):
        combined = CombinedReward(reward)
        return Reward(combined, name=combined.__name__)
    raise TypeError(
        f"reward must be a registered name {available_rewards()}, a combination such as "
        f"'jpeg_compressibility+0.5*colorfulness', a reward server's URL 'http://host:port', a list of "
        f"(name_or_callable, weight) pairs or a callable, got {type(reward).__name__}"
    )


register_factory("aesthetic", _aesthetic)
register_factory("prompt_alignment_vlm", _prompt_alignment_vlm)
