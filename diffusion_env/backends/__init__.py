"""Back-ends: the models the environment steps, and the registry that names them.

``make_denoiser("shapes32")`` builds a registered model; :func:`register_model` adds one, e.g. a
user's fine-tuned pipeline wrapped in the :class:`DenoiserBackend` protocol, so that it can be
named wherever a model is named (``gym.make(..., model=name)``, ``agents.train --model name``).
A back-end built from the registry remembers its name (:func:`registered_name`), which is what a
training run records in its saved configuration.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from diffusion_env.backends.base import BackendModule, Conditioning, DenoiserBackend
from diffusion_env.backends.pixel_unet import PROMPT_EMBEDDING, PixelUNetDenoiser, tiny_random_denoiser
from diffusion_env.registry import Registry

ModelFactory = Callable[[], DenoiserBackend]

MODELS: Registry[ModelFactory] = Registry("model", {"tiny-random": tiny_random_denoiser})
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


def make_denoiser(
    model: str | DenoiserBackend,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DenoiserBackend:
    """Resolves ``model`` (a registered name or a back-end object) and places it on device/dtype.

    Raises:
        ValueError: for an unknown model name (the message lists the known ones).
        TypeError: for an object that does not implement :class:`DenoiserBackend`.
    """
    if isinstance(model, str):
        backend = MODELS.get(model, " or a DenoiserBackend object")()
        if not isinstance(backend, DenoiserBackend):
            raise TypeError(f"the factory of model {model!r} returned {type(backend).__name__}, which does not implement DenoiserBackend")
        try:
            _NAMES[backend] = model
        except TypeError:
            pass  # a back-end that cannot be weakly referenced is recorded by no name
    elif isinstance(model, DenoiserBackend):
        backend = model
    else:
        raise TypeError(
            f"model must be a registered name {available_models()} or an object implementing "
            f"DenoiserBackend, got {type(model).__name__}"
        )
    if device is not None or dtype is not None:
        backend.to(device=device, dtype=dtype)
    return backend


__all__ = [
    "MODELS",
    "PROMPT_EMBEDDING",
    "BackendModule",
    "Conditioning",
    "DenoiserBackend",
    "ModelFactory",
    "PixelUNetDenoiser",
    "available_models",
    "make_denoiser",
    "register_model",
    "registered_name",
    "tiny_random_denoiser",
]
