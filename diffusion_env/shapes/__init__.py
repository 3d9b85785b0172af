"""The built-in world: procedural "coloured shapes" scenes and the small model that draws them.

Everything that is specific to the built-in 32x32 world lives in this package and is registered
when it is imported (``import diffusion_env`` does): the model ``"shapes32"`` and its
flow-matching twin ``"shapes32-flow"`` (:mod:`~diffusion_env.shapes.model`, pretrained by
:mod:`~diffusion_env.shapes.pretrain`), the
rewards ``"scene_alignment"`` and ``"prompt_alignment"`` (:mod:`~diffusion_env.shapes.rewards`),
and the prompt sets ``"scenes_train"``, ``"scenes_heldout"`` and their count subsets
(:mod:`~diffusion_env.shapes.prompts`), all from the caption grammar, renderer and parser of
:mod:`~diffusion_env.shapes.scenes`.
"""

from __future__ import annotations

import functools

from diffusion_env.backends import register_model
from diffusion_env.prompts import register_prompt_set
from diffusion_env.rewards import register_factory, register_reward
from diffusion_env.shapes.prompts import heldout_counterpart, scene_prompt_set, scene_prompt_set_names
from diffusion_env.shapes.rewards import SceneParserCaptioner, scene_alignment


def _builtin_model(flow: bool = False):
    # The model module loads diffusers' UNet classes; import it when the model is first built.
    from diffusion_env.shapes.model import FLOW_WEIGHTS_DIR, WEIGHTS_DIR, load_builtin_denoiser

    return load_builtin_denoiser(FLOW_WEIGHTS_DIR if flow else WEIGHTS_DIR)


def _prompt_alignment():
    """The DDPO prompt-alignment reward (Black et al., 2023, Sec. 6.3) with the offline scene captioner."""
    # Imported on first use: the scorer loads the MiniLM encoder.
    from diffusion_env.rewards.prompt_alignment import PromptAlignmentReward

    return PromptAlignmentReward(SceneParserCaptioner())


register_model("shapes32", _builtin_model)
register_model("shapes32-flow", functools.partial(_builtin_model, flow=True))
register_reward("scene_alignment", scene_alignment)
register_factory("prompt_alignment", _prompt_alignment)
for _name, (_split, _subset) in scene_prompt_set_names().items():
    register_prompt_set(_name, functools.partial(scene_prompt_set, _split, _subset))

__all__ = ["SceneParserCaptioner", "heldout_counterpart", "scene_alignment", "scene_prompt_set"]
