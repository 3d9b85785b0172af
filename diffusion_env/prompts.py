"""Prompt sets: where each episode's prompt (and what is known about it) comes from."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class PromptSet:
    """A finite set of prompts, each with a metadata dict, sampled uniformly with replacement.

    Args:
        prompts: the prompt strings (at least one).
        metadata: one dict per prompt (e.g. the attributes a scene parser checks); empty dicts if
            omitted.
        name: how the set is reported.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        name: str = "custom",
    ) -> None:
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"a prompt set needs one or more prompt strings, got {prompts!r}")
        metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in prompts]
        if len(metadata) != len(prompts):
            raise ValueError(f"got {len(metadata)} metadata dicts for {len(prompts)} prompts; allowed: one per prompt")
        self.prompts = prompts
        self.metadata = metadata
        self.name = name

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, {len(self)} prompts)"

    def sample(self, count: int, rng: np.random.Generator) -> tuple[list[str], list[dict[str, Any]]]:
        """``count`` prompts drawn uniformly with replacement, and a copy of their metadata."""
        indices = rng.integers(len(self.prompts), size=count)
        return [self.prompts[i] for i in indices], [dict(self.metadata[i]) for i in indices]


#: Suffixes of the scene prompt sets restricted by shape count, and the counts each keeps.
SCENE_COUNT_SUBSETS: dict[str, tuple[int, ...]] = {"several": (2, 3), "three": (3,)}


def _scene_prompt_set(split: str, counts_subset: str | None = None) -> PromptSet:
    from diffusion_env import scenes

    pairs = scenes.train_prompts() if split == "train" else scenes.heldout_prompts()
    name = f"scenes_{split}"
    if counts_subset is not None:
        counts = SCENE_COUNT_SUBSETS[counts_subset]
        pairs = [(prompt, meta) for prompt, meta in pairs if meta["count"] in counts]
        name += f"_{counts_subset}"
    return PromptSet([p for p, _ in pairs], [m for _, m in pairs], name=name)


#: Registered sets. ``scenes_*_several`` keep the scenes of two or three shapes and
#: ``scenes_*_three`` those of three, the prompts on which the built-in model miscounts most
#: often (the prompt-alignment task's headroom).
PROMPT_SETS: dict[str, Callable[[], PromptSet]] = {
    "scenes_train": lambda: _scene_prompt_set("train"),
    "scenes_heldout": lambda: _scene_prompt_set("heldout"),
    **{
        f"scenes_{split}_{subset}": functools.partial(_scene_prompt_set, split, subset)
        for subset in SCENE_COUNT_SUBSETS
        for split in ("train", "heldout")
    },
}


def heldout_counterpart(name: str) -> str | None:
    """The registered set of held-out prompts that matches the training set ``name``, or None.

    ``scenes_train`` -> ``scenes_heldout``, ``scenes_train_three`` -> ``scenes_heldout_three``:
    the same shape counts, on the (colour, shape, background) combinations never trained on, so
    that a run is evaluated on prompts like those it trained on, yet unseen.
    """
    if not name.startswith("scenes_train"):
        return None
    counterpart = "scenes_heldout" + name.removeprefix("scenes_train")
    return counterpart if counterpart in PROMPT_SETS else None


def make_prompt_set(prompts: str | Sequence[str] | PromptSet) -> PromptSet:
    """Resolves a registered set name, a list of prompt strings or a :class:`PromptSet`.

    A string that names no registered set is refused rather than taken as a one-prompt set, so a
    misspelt set name fails loudly; pass ``[prompt]`` for a single fixed prompt.

    Raises:
        ValueError: for an unknown set name or an empty list.
        TypeError: for any other type.
    """
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(
                f"unknown prompt set {prompts!r}; allowed: {sorted(PROMPT_SETS)}, a list of prompt "
                "strings, or a PromptSet"
            )
        return PROMPT_SETS[prompts]()
    if isinstance(prompts, Sequence):
        return PromptSet(prompts)
    raise TypeError(
        f"prompts must be a set name {sorted(PROMPT_SETS)}, a list of strings or a PromptSet, "
        f"got {type(prompts).__name__}"
    )
