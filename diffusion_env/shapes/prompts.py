"""The scene prompt sets: the train and held-out splits of the scene grammar, and their count subsets."""

from __future__ import annotations

from diffusion_env.prompts import PromptSet, available_prompt_sets
from diffusion_env.shapes import scenes

#: Suffixes of the scene prompt sets restricted by shape count, and the counts each keeps.
#: ``scenes_*_several`` keep the scenes of two or three shapes and ``scenes_*_three`` those of
#: three, the prompts on which the built-in model miscounts most often (the prompt-alignment
#: task's headroom).
SCENE_COUNT_SUBSETS: dict[str, tuple[int, ...]] = {"several": (2, 3), "three": (3,)}

#: The splits of the scene grammar.
SPLITS: tuple[str, ...] = ("train", "heldout")


def scene_prompt_set(split: str, counts_subset: str | None = None) -> PromptSet:
    """The prompts of ``split`` (``"train"`` or ``"heldout"``), optionally only a count subset's."""
    pairs = scenes.train_prompts() if split == "train" else scenes.heldout_prompts()
    name = f"scenes_{split}"
    if counts_subset is not None:
        counts = SCENE_COUNT_SUBSETS[counts_subset]
        pairs = [(prompt, meta) for prompt, meta in pairs if meta["count"] in counts]
        name += f"_{counts_subset}"
    return PromptSet([p for p, _ in pairs], [m for _, m in pairs], name=name)


def scene_prompt_set_names() -> dict[str, tuple[str, str | None]]:
    """Every scene prompt-set name with its (split, count subset)."""
    names: dict[str, tuple[str, str | None]] = {}
    for split in SPLITS:
        names[f"scenes_{split}"] = (split, None)
        names.update({f"scenes_{split}_{subset}": (split, subset) for subset in SCENE_COUNT_SUBSETS})
    return names


def heldout_counterpart(name: str) -> str | None:
    """The registered set of held-out prompts that matches the training set ``name``, or None.

    ``scenes_train`` -> ``scenes_heldout``, ``scenes_train_three`` -> ``scenes_heldout_three``:
    the same shape counts, on the (colour, shape, background) combinations never trained on, so
    that a run is evaluated on prompts like those it trained on, yet unseen.
    """
    if not name.startswith("scenes_train"):
        return None
    counterpart = "scenes_heldout" + name.removeprefix("scenes_train")
    return counterpart if counterpart in available_prompt_sets() else None
