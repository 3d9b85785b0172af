"""diffusers pipelines as back-ends: loading one by hub id or folder, and wrapping it by its type.

A model may be named by a diffusers pipeline object, a local folder written by a pipeline's
``save_pretrained``, or a Hugging Face hub id (:data:`CHECKPOINTS` names common ones). The
pipeline's type picks the back-end class that wraps it (:func:`register_pipeline_backend`): Stable
Diffusion 1.x/2.x, SDXL, Stable Diffusion 3/3.5 and FLUX.1 are built in; a new model family is one
back-end module and one registration.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from diffusion_env.backends.base import DenoiserBackend
from diffusion_env.registry import Registry

PipelineBackendFactory = Callable[..., DenoiserBackend]

#: Registered model names of common checkpoints on the Hugging Face hub.
CHECKPOINTS: dict[str, str] = {
    "sd-1.4": "CompVis/stable-diffusion-v1-4",
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}

#: Pipeline class name -> back-end factory. Keyed by name, so that registering costs no import of
#: the pipeline classes (which load their text and image models' code).
PIPELINE_BACKENDS: Registry[PipelineBackendFactory] = Registry("pipeline back-end")


def register_pipeline_backend(pipeline_class: str, factory: PipelineBackendFactory, overwrite: bool = False) -> None:
    """Makes ``factory(pipeline, **options)`` the back-end of pipelines of the class named
    ``pipeline_class`` (or a subclass of it), e.g. ``"StableDiffusionPipeline"``."""
    PIPELINE_BACKENDS.register(pipeline_class, factory, overwrite)


def supported_pipelines() -> list[str]:
    """The names of the pipeline classes a back-end is registered for."""
    return PIPELINE_BACKENDS.names()


def backend_for_pipeline(pipeline: DiffusionPipeline, **options: Any) -> DenoiserBackend:
    """The back-end of ``pipeline``'s class, built with ``options`` (e.g. ``height``, ``negative_prompt``)."""
    factory = PIPELINE_BACKENDS.for_instance(pipeline)
    if factory is None:
        raise TypeError(f"no back-end for a {type(pipeline).__name__}; allowed: {supported_pipelines()}")
    parameters = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(list(parameters)[1:]))
        if unknown:
            raise ValueError(f"a {type(pipeline).__name__} takes no option(s) {unknown}; allowed: {list(parameters)[1:]}")
    return factory(pipeline, **options)


def is_pipeline_source(name: str) -> bool:
    """Whether ``name`` names a pipeline: an existing folder, or a hub id ``owner/name``."""
    return Path(name).is_dir() or (name.count("/") == 1 and not name.startswith(("/", ".")) and " " not in name)


def load_pipeline(source: str | os.PathLike[str]) -> DiffusionPipeline:
    """A pipeline from a folder or a hub id; nothing is downloaded for a folder or with ``HF_HUB_OFFLINE=1``.

    Raises:
        FileNotFoundError: naming the source and what is missing.
    """
    source = str(source)
    folder = Path(source).is_dir()
    if folder and not (Path(source) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{source} holds no model_index.json; allowed: a folder written by a diffusers pipeline's "
            "save_pretrained (model_index.json beside one folder per component)"
        )
    offline = folder or os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")
    # A folder saved without a component (SD3 without its T5 encoder: text_encoder_3=None) records
    # it as [null, null]; diffusers loads such a folder only when told that the part is absent.
    absent = {}
    if folder:
        index = json.loads((Path(source) / "model_index.json").read_text())
        absent = {name: None for name, entry in index.items() if not name.startswith("_") and entry == [None, None]}
    try:
        return DiffusionPipeline.from_pretrained(source, local_files_only=offline, **absent)
    except OSError as error:
        where = "in this folder" if folder else "in the local Hugging Face cache (HF_HUB_OFFLINE=1 forbids downloads)"
        raise FileNotFoundError(f"cannot load pipeline {source!r}: files missing {where}: {error}") from None
