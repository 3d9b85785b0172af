"""Prompt sets: where each episode's prompt (and what is known about it) comes from."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pathlib import Path

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

_PROMPT_SETS: dict[str, PromptSetFactory] = {}


def register_prompt_set(name: str, factory: PromptSetFactory, overwrite: bool = False) -> None:
    """Makes ``factory()`` available as ``prompts=name`` wherever a prompt set is named.

    Raises:
        ValueError: if ``name`` is taken and ``overwrite`` is False, or is empty.
        TypeError: if ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a prompt-set name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"prompt set {name!r} must be a callable returning a PromptSet, got {type(factory).__name__}")
    if name in _PROMPT_SETS and not overwrite:
        raise ValueError(f"prompt set {name!r} is already registered; pass overwrite=True to replace it")
    _PROMPT_SETS[name] = factory


def available_prompt_sets() -> list[str]:
    """The registered prompt-set names."""
    return sorted(_PROMPT_SETS)


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
        if prompts not in _PROMPT_SETS:
            raise ValueError(
                f"unknown prompt set {prompts!r}; allowed: {available_prompt_sets()}, a list of prompt "
                "strings, PromptSet.from_file(path), or a PromptSet"
            )
        return _PROMPT_SETS[prompts]()
    if isinstance(prompts, Sequence):
        return PromptSet(prompts)
    raise TypeError(
        f"prompts must be a set name {available_prompt_sets()}, a list of strings or a PromptSet, "
        f"got {type(prompts).__name__}"
    )
