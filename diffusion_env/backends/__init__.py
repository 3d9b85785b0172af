"""Back-ends: the models the environment steps, and the registry that names them.

A model is named by a registered name (``"shapes32"``, ``"sd-1.5"``: :func:`register_model` adds
one), a diffusers pipeline object, a folder written by a pipeline's ``save_pretrained``, or a
Hugging Face hub id (Stable Diffusion 1.x/2.x, SDXL, Stable Diffusion 3/3.5 and FLUX.1 pipelines
are built in, see :mod:`~diffusion_env.backends.pipelines`), or given as a :class:`DenoiserBackend`
object.
A back-end built from a name remembers it (:func:`registered_name`), which is what a training
run records in its saved configuration.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline

from diffusion_env.backends.base import BackendModule, Conditioning, DenoiserBackend
from diffusion_env.backends.flux import FluxBackend
from diffusion_env.backends.pipelines import (
    CHECKPOINTS,
    backend_for_pipeline,
    is_pipeline_source,
    load_pipeline,
    register_pipeline_backend,
    supported_pipelines,
)
from diffusion_env.backends.pixel_unet import PROMPT_EMBEDDING, PixelUNetDenoiser, tiny_random_denoiser
from diffusion_env.backends.sd3 import StableDiffusion3Backend
from diffusion_env.backends.stable_diffusion import StableDiffusionBackend
from diffusion_env.registry import Registry

#: ``factory(**options) -> DenoiserBackend``; options such as ``height`` or ``negative_prompt``
#: come from the environment's arguments, for the models that take them.
ModelFactory = Callable[..., DenoiserBackend]

MODELS: Registry[ModelFactory] = Registry("model", {"tiny-random": tiny_random_denoiser})
register_pipeline_backend("StableDiffusionPipeline", StableDiffusionBackend)
register_pipeline_backend("StableDiffusionXLPipeline", StableDiffusionBackend)
register_pipeline_backend("StableDiffusion3Pipeline", StableDiffusion3Backend)
register_pipeline_backend("FluxPipeline", FluxBackend)


def _from_pipeline_source(source: str, **options: Any) -> DenoiserBackend:
    return backend_for_pipeline(load_pipeline(source), **options)


for _name, _source in CHECKPOINTS.items():
    MODELS.register(_name, functools.partial(_from_pipeline_source, _source))


def _tiny_sd(xl: bool, **options: Any) -> DenoiserBackend:
    # Imported when built: the pipeline classes load their text and image models' code.
    from diffusion_env.backends.tiny_pipelines import tiny_sd_backend

    return tiny_sd_backend(xl, **options)


def _tiny_flow(family: str, **options: Any) -> DenoiserBackend:
    # Imported when built, as the Stable Diffusion ones.
    from diffusion_env.backends.tiny_flow_pipelines import tiny_flow_backend

    return tiny_flow_backend(family, **options)


MODELS.register("tiny-sd", functools.partial(_tiny_sd, False))
MODELS.register("tiny-sdxl", functools.partial(_tiny_sd, True))
MODELS.register("tiny-sd3", functools.partial(_tiny_flow, "sd3"))
MODELS.register("tiny-flux", functools.partial(_tiny_flow, "flux"))
_NAMES: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def register_model(name: str, factory: ModelFactory, overwrite: bool = False) -> None:
    """Makes ``factory()`` (a :class:`DenoiserBackend`) available as ``model=name``."""
    MODELS.register(name, factory, overwrite)


def available_models() -> list[str]:
    """The registered model names."""
    return MODELS.names()


def registered_name(backend: object) -> str | None:
    """The name ``backend`` was built from by :func:`make_denoiser`, or None for an object built otherwise."""
    try:
        return _NAMES.get(backend)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def _build(name: str, factory: ModelFactory, options: dict[str, Any]) -> DenoiserBackend:
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        raise ValueError(f"model {name!r} takes no option(s) {sorted(options)}") from None
    return factory(**options)


def make_denoiser(
    model: str | DiffusionPipeline | DenoiserBackend,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> DenoiserBackend:
    """Resolves ``model`` and places it on device/dtype.

    Args:
        model: a registered name, a hub id or pipeline folder, a diffusers pipeline object, or a
            :class:`DenoiserBackend` object.
        device, dtype: where and in what precision the back-end runs.
        options: the back-end's construction options (e.g. ``height``, ``width``,
            ``negative_prompt`` of Stable Diffusion); refused for a back-end object, which is
            built already, and for models that take none.

    Raises:
        ValueError: for an unknown model name (the message lists the known ones) or options the
            model does not take; FileNotFoundError: for a checkpoint that is not on disk.
        TypeError: for an object that is neither a pipeline of a supported type nor a back-end.
    """
    if isinstance(model, str):
        if model in MODELS or not is_pipeline_source(model):
            factory = MODELS.get(model, ", a hub id owner/name, a pipeline folder, or a DenoiserBackend object")
            backend = _build(model, factory, options)
        else:
            backend = _from_pipeline_source(model, **options)
        if not isinstance(backend, DenoiserBackend):
            raise TypeError(f"model {model!r} built a {type(backend).__name__}, which does not implement DenoiserBackend")
        try:
            _NAMES[backend] = model
        except TypeError:
            pass  # a back-end that cannot be weakly referenced is recorded by no name
    elif isinstance(model, DiffusionPipeline):
        backend = backend_for_pipeline(model, **options)
    elif isinstance(model, DenoiserBackend):
        if options:
            raise ValueError(
                f"options {sorted(options)} cannot change a back-end object that is built already; allowed: "
                "give them when building it, or pass the model's name or pipeline instead"
            )
        backend = model
    else:
        raise TypeError(
            f"model must be a registered name {available_models()}, a hub id or pipeline folder, a diffusers "
            f"pipeline ({', '.join(supported_pipelines())}) or a DenoiserBackend object, got {type(model).__name__}"
        )
    if device is not None or dtype is not None:
        backend.to(device=device, dtype=dtype)
    return backend


__all__ = [
    "CHECKPOINTS",
    "MODELS",
    "PROMPT_EMBEDDING",
    "BackendModule",
    "Conditioning",
    "DenoiserBackend",
    "FluxBackend",
    "ModelFactory",
    "PixelUNetDenoiser",
    "StableDiffusion3Backend",
    "StableDiffusionBackend",
    "available_models",
    "make_denoiser",
    "register_model",
    "register_pipeline_backend",
    "registered_name",
    "tiny_random_denoiser",
]
