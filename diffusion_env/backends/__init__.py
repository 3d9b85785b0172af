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

ModelFactory = Callable[[], DenoiserBackend]

_MODELS: dict[str, ModelFactory] = {"tiny-random": tiny_random_denoiser}
_NAMES: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def register_model(name: str, factory: ModelFactory, overwrite: bool = False) -> None:
    """Makes ``factory()`` available as ``model=name``.

    Raises:
        ValueError: if ``name`` is taken and ``overwrite`` is False, or is empty.
        TypeError: if ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"model {name!r} must be a callable returning a DenoiserBackend, got {type(factory).__name__}")
    if name in _MODELS and not overwrite:
        raise ValueError(f"model {name!r} is already registered; pass overwrite=True to replace it")
    _MODELS[name] = factory


def available_models() -> list[str]:
    """The registered model names."""
    return sorted(_MODELS)


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
        if model not in _MODELS:
            raise ValueError(f"unknown model {model!r}; allowed: {available_models()} or a DenoiserBackend object")
        backend = _MODELS[model]()
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
