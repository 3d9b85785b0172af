"""The shared part of the back-ends over a diffusers text-to-image pipeline.

Stable Diffusion 1.x/2.x/XL, Stable Diffusion 3 and FLUX.1 back-ends all hold a trained network
(a UNet or a transformer) beside frozen parts (a VAE and one to three text encoders), encode
prompts with the pipeline's own ``encode_prompt``, guide with a cached negative prompt and decode
latents with the VAE. :class:`PipelineBackend` is that common part; each family's module adds its
network call and its prompt encoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import DiffusionPipeline
from torch import nn

from diffusion_env.backends.base import BackendModule, Conditioning
from diffusion_env.validation import check_int

#: ``network(latents, timesteps, conditioning) -> output``: one call of a back-end's network.
NetworkCall = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


class PipelineBackend(BackendModule):
    """A base for back-ends over a diffusers pipeline: its frozen parts, prompts, guidance and decoding.

    The frozen parts (VAE, text encoders) become submodules with gradients off, in ``frozen_dtype``
    after every move when one is given. A subclass sets its network as a submodule, implements
    ``trainable_module``, ``_encode`` (one batch of prompts) and ``predict`` (with
    :meth:`_guided`), and declares ``latent_shape``, ``scheduler`` and ``conditioning_shapes``.

    Args:
        pipeline: the diffusers pipeline; kept for its ``encode_prompt``.
        pipeline_types: the pipeline classes the subclass accepts.
        frozen: the names of the pipeline's frozen components (absent or None ones are skipped).
        negative_prompt: the prompt of the unconditional branch of classifier-free guidance.
        default_guidance_scale: the guidance weight used when the environment names none.
        frozen_dtype: the dtype of the frozen parts (default: the network's), e.g.
            ``torch.float16`` on a GPU while the trained network (or its LoRA adapters) stays in float32.
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        pipeline_types: tuple[type[DiffusionPipeline], ...],
        frozen: tuple[str, ...],
        negative_prompt: str,
        default_guidance_scale: float,
        frozen_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        if not isinstance(pipeline, pipeline_types):
            allowed = " or ".join(kind.__name__ for kind in pipeline_types)
            raise TypeError(f"pipeline is a {type(pipeline).__name__}; allowed: a diffusers {allowed}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
        self._frozen_names = tuple(name for name in frozen if getattr(pipeline, name, None) is not None)
        for name in self._frozen_names:
            setattr(self, name, getattr(pipeline, name).requires_grad_(False).eval())
        # The pipeline holds the same modules as this back-end: it is kept for its prompt encoding.
        self.pipeline = pipeline
        self.negative_prompt = negative_prompt
        self.default_guidance_scale = float(default_guidance_scale)
        self.frozen_dtype = frozen_dtype
        self._negative: dict[str, torch.Tensor] | None = None
        self._moved()

    def _moved(self) -> None:
        # The frozen parts may run in a lower precision than the trained network; cached negative
        # conditioning is recomputed on the new device.
        if self.frozen_dtype is not None:
            for name in self._frozen_names:
                getattr(self, name).to(dtype=self.frozen_dtype)
        self._negative = None

    @staticmethod
    def _image_size(height: int | None, width: int | None, default: int, multiple: int, what: str) -> tuple[int, int]:
        """``(height, width)`` in pixels (``default`` for None), each a positive multiple of
        ``multiple`` (described as ``what`` in the error)."""
        sizes = []
        for name, size in (("height", height), ("width", width)):
            size = check_int(name, default if size is None else size, multiple)
            if size % multiple:
                raise ValueError(f"{name}={size}; allowed: a positive multiple of {what}")
            sizes.append(size)
        return sizes[0], sizes[1]

    # ------------------------------------------------------------------ prompts

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning of a batch of prompts, in the network's dtype on its device."""
        raise NotImplementedError

    def _encode_negative(self) -> dict[str, torch.Tensor]:
        """The negative prompt's conditioning ``(1, ...)``; encoded as a prompt unless a pipeline does otherwise."""
        return self._encode([self.negative_prompt])

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a sequence of str, got {prompts!r}")
        with torch.no_grad():
            return self._encode(list(prompts))

    def negative_conditioning(self, batch: int) -> dict[str, torch.Tensor]:
        """The negative prompt's conditioning, repeated ``batch`` times (encoded once per device)."""
        if self._negative is None:
            with torch.no_grad():
                self._negative = self._encode_negative()
        return {key: value.expand(batch, *value.shape[1:]) for key, value in self._negative.items()}

    # ------------------------------------------------------------------ the network

    def _guided(
        self, network: NetworkCall, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, scale: float
    ) -> torch.Tensor:
        """``network``'s output with classifier-free guidance of weight ``scale`` (Ho & Salimans,
        2022, Eq. 6): out = out_negative + w (out_conditional - out_negative), from one call on the
        batch [negative; conditional]; a plain call for w = 1."""
        latents = latents.to(self.dtype)
        timesteps = timesteps.to(latents.device)
        if scale == 1.0:
            return network(latents, timesteps, conditioning)
        negative = self.negative_conditioning(latents.shape[0])
        doubled = {key: torch.cat([negative[key], conditioning[key].to(negative[key].device)]) for key in negative}
        output = network(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), doubled)
        output_negative, output_conditional = output.chunk(2)
        return output_negative + scale * (output_conditional - output_negative)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, H, W, 3)`` uint8: the VAE's decoding of ``latents / scaling_factor + shift_factor``."""
        vae: nn.Module = self.vae
        scaled = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            scaled = scaled + vae.config.shift_factor
        pixels = (vae.decode(scaled).sample.float() / 2 + 0.5).clamp(0, 1) * 255
        return pixels.round().to(torch.uint8).permute(0, 2, 3, 1)
