"""Prompt sets: where each episode's prompt (and what is known about it) comes from."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pathlib import Path

import numpy as np

from diffusion_env.registry import Registry


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

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PromptSet:
        """The prompts of a UTF-8 text file, one a line; blank lines and lines starting with ``#`` are skipped.

        Raises:
            FileNotFoundError: if there is no such file; ValueError: if it holds no prompt.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist; allowed: a text file of one prompt a line")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        if not prompts:
            raise ValueError(f"prompt file {str(path)!r} holds no prompt; allowed: one prompt a line ('#' starts a comment line)")
        return cls(prompts, name=path.name)

    def sample(self, count: int, rng: np.random.Generator) -> tuple[list[str], list[dict[str, Any]]]:
        """``count`` prompts drawn uniformly with replacement, and a copy of their metadata."""
        indices = rng.integers(len(self.prompts), size=count)
        return [self.prompts[i] for i in indices], [dict(self.metadata[i]) for i in indices]


PromptSetFactory = Callable[[], PromptSet]

PROMPT_SETS: Registry[PromptSetFactory] = Registry("prompt set")


def register_prompt_set(name: str, factory: PromptSetFactory, overwrite: bool = False) -> None:
    """Makes ``factory()`` (a :class:`PromptSet`) available as ``prompts=name``."""
    PROMPT_SETS.register(name, factory, overwrite)


def available_prompt_sets() -> list[str]:
    """The registered prompt-set names."""
    return PROMPT_SETS.names()


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
        return PROMPT_SETS.get(prompts, ", a list of prompt strings, PromptSet.from_file(path), or a PromptSet")()
    if isinstance(prompts, Sequence):
        return PromptSet(prompts)
    raise TypeError(
        f"prompts must be a set name {available_prompt_sets()}, a list of strings or a PromptSet, "
        f"got {type(prompts).__name__}"
    )


#: Common animals, the kind of prompt list the DDPO paper trains Stable Diffusion's compressibility
#: and aesthetic tasks on (Black et al., 2023, Sec. 6.1: 45 common animals, one a prompt).
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "chicken", "duck", "rabbit", "mouse", "hamster",
    "deer", "fox", "wolf", "bear", "lion", "tiger", "leopard", "cheetah", "elephant", "giraffe", "zebra",
    "monkey", "gorilla", "kangaroo", "koala", "panda", "raccoon", "squirrel", "hedgehog", "otter", "seal",
    "dolphin", "whale", "shark", "octopus", "turtle", "frog", "snake", "lizard", "owl", "eagle", "parrot",
    "penguin",
)
#: The activities of the paper's prompt-alignment task: "a(n) <animal> <activity>" (Sec. 6.3).
ACTIVITIES: tuple[str, ...] = ("riding a bike", "playing chess", "washing the dishes")


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def animal_prompts() -> PromptSet:
    """``"animals"``: one prompt per animal of :data:`ANIMALS`, with ``{"animal": ...}`` metadata."""
    return PromptSet(list(ANIMALS), [{"animal": animal} for animal in ANIMALS], name="animals")


def animal_activity_prompts() -> PromptSet:
    """``"animal_activities"``: "a(n) <animal> <activity>" for every animal and activity, with metadata."""
    pairs = [(animal, activity) for animal in ANIMALS for activity in ACTIVITIES]
    return PromptSet(
        [f"{_with_article(animal)} {activity}" for animal, activity in pairs],
        [{"animal": animal, "activity": activity} for animal, activity in pairs],
        name="animal_activities",
    )


register_prompt_set("animals", animal_prompts)
register_prompt_set("animal_activities", animal_activity_prompts)
