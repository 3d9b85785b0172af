"""The built-in world's rewards: scene alignment, and the offline captioner of the prompt-alignment reward.

Both read an image back into scene attributes with :func:`~diffusion_env.shapes.scenes.parse_scenes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffusion_env.rewards.prompt_alignment import check_image_batch
from diffusion_env.shapes import scenes


#: The prompt attributes that :func:`scene_alignment` checks (the scene metadata keys).
SCENE_ALIGNMENT_KEYS: tuple[str, ...] = scenes.ATTRIBUTE_KEYS


def scene_alignment(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fraction of the prompt's scene attributes that the image shows, read by :func:`scenes.parse_scenes`.

    An offline stand-in for the VLM prompt-alignment reward of the DDPO paper (Black et al., 2023,
    Sec. 6.1), for the built-in "coloured shapes" scene model: each image is parsed back into
    background, colour, shape, count and size, and scored by the fraction of the attributes its
    prompt's metadata names that agree. Details: per attribute, 1.0 (match), 0.0 (mismatch) or
    NaN (the prompt does not name it; use ``np.nanmean`` to average a detail over a batch).

    Raises:
        ValueError: if a sample's metadata names none of the scene attributes.
    """
    parsed = scenes.parse_scenes(images.cpu().numpy())
    batch = len(parsed)
    details = {f"scene_{key}": np.full(batch, np.nan, dtype=np.float32) for key in SCENE_ALIGNMENT_KEYS}
    score = np.zeros(batch, dtype=np.float32)
    for index, (scene, meta) in enumerate(zip(parsed, metadata)):
        named = [key for key in SCENE_ALIGNMENT_KEYS if key in meta]
        if not named:
            raise ValueError(
                f"sample {index} (prompt {prompts[index]!r}) has metadata keys {sorted(meta)}; "
                f"scene_alignment needs at least one of {list(SCENE_ALIGNMENT_KEYS)} (use a scenes prompt set)"
            )
        for key in named:
            details[f"scene_{key}"][index] = float(getattr(scene, key) == meta[key])
        score[index] = np.mean([details[f"scene_{key}"][index] for key in named])
    return score, details


class SceneParserCaptioner:
    """Captions the built-in model's scenes offline, by parsing them with :func:`scenes.parse_scenes`.

    The stand-in for the DDPO paper's VLM on the "coloured shapes" scenes: the caption uses the
    scene vocabulary ("two small red circles on a blue background"), so a faithful image's caption
    repeats its prompt word for word. An image without a shape is described by its background
    alone ("a red background"), and a cluttered one with the number of shapes in digits
    ("5 small red circles ..."), so the caption never claims what the image does not show.
    """

    __name__ = "scene_parser_captioner"

    def __call__(self, images: torch.Tensor) -> list[str]:
        """Scene captions of uint8 images ``(B, H, W, 3)`` (height and width at least 8)."""
        check_image_batch(images)
        return [self._caption(parsed) for parsed in scenes.parse_scenes(images.cpu().numpy())]

    @staticmethod
    def _caption(parsed: scenes.ParsedScene) -> str:
        article = "an" if parsed.background[0] in "aeiou" else "a"
        if parsed.shape is None or parsed.color is None or parsed.size is None or parsed.count < 1:
            return f"{article} {parsed.background} background"
        if parsed.count in scenes.COUNTS and parsed.color != parsed.background:
            return scenes.describe(parsed.background, parsed.color, parsed.shape, parsed.count, parsed.size)
        # Outside the prompt grammar (more than three shapes): same wording, count in digits.
        return f"{parsed.count} {parsed.size} {parsed.color} {parsed.shape}s on {article} {parsed.background} background"
