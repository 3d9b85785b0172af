"""The back-end protocol: what a text-to-image diffusion model must provide to be stepped as an MDP.

A back-end bundles a prompt encoder, a conditional network with classifier-free guidance, the
diffusers scheduler that defines its sampler, and a decoder from latents to images. It declares
the conditioning entries of the observation (``conditioning_shapes``): one token sequence for the
built-in model (``"prompt_embedding"``), more for models that need them (pooled text embeddings
for SDXL, Stable Diffusion 3 and FLUX, time ids for SDXL). A back-end whose schedule needs more
than its scheduler's configuration (FLUX's resolution-dependent shift) says so through an
optional ``sampler_options(num_inference_steps)`` method (:func:`backend_sampler_options`).
Back-ends import nothing of the environment.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from diffusion_env.samplers import Sampler, SamplerFactory, make_sampler

#: Conditioning tensors of a batch of prompts, keyed as the observation keys them.
Conditioning = Mapping[str, torch.Tensor]


@runtime_checkable
class DenoiserBackend(Protocol):
    """What a text-to-image diffusion model must provide to be stepped as an MDP.

    Attributes:
        latent_shape: ``(C, H, W)`` of one latent.
        scheduler: the diffusers scheduler whose config defines the sampler.
        conditioning_shapes: the observation's conditioning entries: key -> shape of one prompt's
            tensor (float32 in the observation).
        default_guidance_scale: the classifier-free guidance weight the model is meant for.
        device, dtype: where and in what precision the network runs.
    """

    latent_shape: tuple[int, int, int]
    scheduler: SchedulerMixin
    conditioning_shapes: dict[str, tuple[int, ...]]
    default_guidance_scale: float
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The conditioning of each prompt: ``{key: (B, *conditioning_shapes[key])}`` on ``device``."""
        ...

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The network's output for ``latents`` ``(B, C, H, W)`` at ``timesteps`` ``(B,)``.

        The output is in the parametrisation the sampler expects (the noise eps for an
        epsilon-prediction model), with classifier-free guidance applied when
        ``guidance_scale != 1``: out = out_uncond + w * (out_cond - out_uncond).
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, H, W, 3)`` uint8 on ``device`` from latents ``(B, C, H, W)``."""
        ...

    def trainable_module(self) -> nn.Module:
        """The network whose parameters a policy fine-tunes (the UNet or transformer)."""
        ...

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DenoiserBackend:
        """Moves the back-end (in place, like ``nn.Module.to``) and returns it."""
        ...


def backend_sampler_options(backend: DenoiserBackend, num_inference_steps: int) -> dict[str, Any]:
    """The sampler options ``backend``'s schedule needs beyond its scheduler's configuration (e.g.
    FLUX's ``mu`` and ``sigmas``), from its optional ``sampler_options(num_inference_steps)``
    method; empty for a back-end without one. Options the caller gives take precedence."""
    options = getattr(backend, "sampler_options", None)
    return dict(options(num_inference_steps)) if callable(options) else {}


def backend_sampler(
    backend: DenoiserBackend,
    num_inference_steps: int,
    sampler: str | SamplerFactory | None = None,
    **options: Any,
) -> Sampler:
    """The sampler of ``backend``'s scheduler with K = ``num_inference_steps`` steps, on its device:
    :func:`~diffusion_env.samplers.make_sampler` with the back-end's own options
    (:func:`backend_sampler_options`), which ``options`` override."""
    merged = {**backend_sampler_options(backend, num_inference_steps), **options}
    return make_sampler(backend.scheduler, num_inference_steps, sampler, device=backend.device, **merged)


class BackendModule(nn.Module):
    """A base for back-ends that are ``nn.Module`` s: ``device``/``dtype`` and moving the frozen parts.

    ``device`` and ``dtype`` are read from the first parameter of :meth:`trainable_module`
    (diffusers' ``ModelMixin.device`` scans the whole module, about 0.6 ms each, and the MDP asks
    several times a step). Parts that are not submodules (a prompt encoder shared by several
    back-ends, a cache) follow every ``to``/``cuda``/``half`` through :meth:`_moved`.
    """

    def trainable_module(self) -> nn.Module:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.trainable_module().parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.trainable_module().parameters()).dtype

    def network_precision(self) -> contextlib.AbstractContextManager[object]:
        """The context a network call runs in: autocast to the network's dtype when that is half
        precision (so that LoRA adapters kept in float32 mix with half-precision weights), else nothing."""
        if self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def with_network(self, network: nn.Module) -> BackendModule:
        """A shallow copy of this back-end whose trainable network is ``network``; every other part
        (VAE, text encoders, scheduler) is shared, not copied. For a frozen reference of a fully
        fine-tuned network: only the network is duplicated."""
        current = self.trainable_module()
        name = next((key for key, module in self._modules.items() if module is current), None)
        if name is None:
            raise TypeError(f"{type(self).__name__}.trainable_module() is not one of its submodules")
        clone = copy.copy(self)
        clone._modules = {**self._modules, name: network}
        return clone

    def _moved(self) -> None:
        """Called after every move or cast; moves what is not a submodule (nothing by default)."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args, **kwargs) -> BackendModule:
        # nn.Module.to/cuda/half all funnel through _apply.
        super()._apply(fn, *args, **kwargs)
        self._moved()
        return self
