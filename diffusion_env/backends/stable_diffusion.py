"""Stable Diffusion 1.x/2.x and SDXL as back-ends: a diffusers pipeline's UNet, VAE and text encoders.

The back-end steps the pipeline's UNet in latent space and decodes with its VAE only when an
image is needed (the last step, ``render``). Prompts are encoded by the pipeline's own
``encode_prompt``; the conditioning entries of the observation are

- Stable Diffusion 1.x/2.x: ``"prompt_embedding"`` ``(77, D)``, the text encoder's token states;
- SDXL: ``"prompt_embedding"`` ``(77, D1 + D2)`` (both encoders' penultimate states, as the
  pipeline concatenates them), ``"pooled_prompt_embedding"`` ``(P,)`` (the second encoder's
  projection) and ``"time_ids"`` ``(6,)`` (original size, crop corner and target size, the
  micro-conditioning of Podell et al., 2023, Sec. 2.2).

Whatever scheduler the checkpoint ships (PNDM for Stable Diffusion 1.x, Euler for SDXL), the
environment samples with DDIM built from its configuration, with ``steps_offset=1`` and
``set_alpha_to_one=False`` so that every step has sigma_t > 0 (as DDPO samples Stable Diffusion:
Black et al., 2023, App. B): the same betas and prediction type, another sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from torch import nn

from diffusion_env.backends.base import BackendModule, Conditioning
from diffusion_env.backends.pixel_unet import PROMPT_EMBEDDING
from diffusion_env.validation import check_int

logger = logging.getLogger(__name__)

POOLED_PROMPT_EMBEDDING = "pooled_prompt_embedding"
TIME_IDS = "time_ids"

#: Registered model names of common checkpoints on the Hugging Face hub.
CHECKPOINTS: dict[str, str] = {
    "sd-1.4": "CompVis/stable-diffusion-v1-4",
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


#: The DDIM settings of Stable Diffusion's own DDIM configuration: every step has sigma_t > 0.
DDIM_SETTINGS: dict[str, Any] = {"steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading"}


def ddim_from(scheduler: Any) -> DDIMScheduler:
    """A ``DDIMScheduler`` with ``scheduler``'s noise schedule and prediction type and
    :data:`DDIM_SETTINGS`, logged when that changes the checkpoint's scheduler."""
    converted = DDIMScheduler.from_config(scheduler.config, **DDIM_SETTINGS)
    unchanged = type(scheduler) is DDIMScheduler and all(scheduler.config.get(k) == v for k, v in DDIM_SETTINGS.items())
    if not unchanged:
        logger.info(
            "sampling with DDIMScheduler(%s) built from the checkpoint's %s",
            ", ".join(f"{key}={value!r}" for key, value in DDIM_SETTINGS.items()),
            type(scheduler).__name__,
        )
    return converted


class StableDiffusionBackend(BackendModule):
    """A ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` as a :class:`DenoiserBackend`.

    Args:
        pipeline: the pipeline (its UNet, VAE and text encoders become this module's submodules;
            its scheduler's configuration gives the DDIM sampler).
        height, width: the image size in pixels, multiples of the VAE's scale factor (default:
            the UNet's ``sample_size`` times that factor, the checkpoint's native size).
        negative_prompt: the prompt of the unconditional branch of classifier-free guidance.
        default_guidance_scale: the guidance weight used when the environment names none (7.5,
            the pipelines' default; DDPO used 5.0).
        frozen_dtype: the dtype of the VAE and the text encoders (default: the UNet's), e.g.
            ``torch.float16`` on a GPU while the trained UNet (or its LoRA adapters) stays in float32.
        channels_last: keep the UNet's weights and activations in channels-last memory format
            (faster convolutions on recent GPUs).
        gradient_checkpointing: recompute the UNet's activations in the backward pass instead of
            keeping them (less memory, about a third more compute).
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = "",
        default_guidance_scale: float = 7.5,
        frozen_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        # Imported here: the pipeline classes load their text and image models' code.
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        super().__init__()
        if not isinstance(pipeline, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise TypeError(
                f"pipeline is a {type(pipeline).__name__}; allowed: a diffusers StableDiffusionPipeline or "
                "StableDiffusionXLPipeline"
            )
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
        self.is_xl = isinstance(pipeline, StableDiffusionXLPipeline)
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        for frozen in (self.vae, self.text_encoder, self.text_encoder_2):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        # The pipeline is kept for its prompt encoding; it holds the same modules as this back-end.
        self.pipeline = pipeline
        self.scheduler = ddim_from(pipeline.scheduler)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.negative_prompt = negative_prompt
        self.default_guidance_scale = float(default_guidance_scale)
        self.frozen_dtype = frozen_dtype
        scale = pipeline.vae_scale_factor
        height = self.unet.config.sample_size * scale if height is None else height
        width = self.unet.config.sample_size * scale if width is None else width
        height, width = (check_int(name, size, scale) for name, size in (("height", height), ("width", width)))
        for name, size in (("height", height), ("width", width)):
            if size % scale:
                raise ValueError(f"{name}={size}; allowed: a positive multiple of the VAE's scale factor {scale}")
        self.height, self.width = height, width
        self.latent_shape: tuple[int, int, int] = (self.unet.config.in_channels, height // scale, width // scale)
        length = pipeline.tokenizer.model_max_length
        if self.is_xl:
            hidden = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
            self.conditioning_shapes: dict[str, tuple[int, ...]] = {
                PROMPT_EMBEDDING: (length, hidden),
                POOLED_PROMPT_EMBEDDING: (self.text_encoder_2.config.projection_dim,),
                TIME_IDS: (6,),
            }
        else:
            self.conditioning_shapes = {PROMPT_EMBEDDING: (length, self.text_encoder.config.hidden_size)}
        self._negative: dict[str, torch.Tensor] | None = None
        self._moved()

    def trainable_module(self) -> nn.Module:
        return self.unet

    def _moved(self) -> None:
        # The frozen parts may run in a lower precision than the trained UNet; cached negative
        # conditioning is recomputed on the new device.
        if self.frozen_dtype is not None:
            for frozen in (self.vae, self.text_encoder, self.text_encoder_2):
                if frozen is not None:
                    frozen.to(dtype=self.frozen_dtype)
        self._negative = None

    # ------------------------------------------------------------------ prompts

    def _negative_prompts(self, count: int) -> list[str] | None:
        # None for the empty negative prompt, as the pipelines' own default: SDXL then uses zeros
        # (force_zeros_for_empty_prompt), Stable Diffusion 1.x/2.x encodes "".
        return [self.negative_prompt] * count if self.negative_prompt else None

    @torch.no_grad()
    def _encode(self, prompts: list[str], negative: bool) -> dict[str, torch.Tensor]:
        device = self.device
        if self.is_xl:
            outputs = self.pipeline.encode_prompt(
                prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=negative,
                negative_prompt=self._negative_prompts(len(prompts)) if negative else None,
            )
            embeds, pooled = (outputs[1], outputs[3]) if negative else (outputs[0], outputs[2])
            sizes = [self.height, self.width, 0, 0, self.height, self.width]
            time_ids = torch.tensor([sizes], dtype=torch.float32, device=device).expand(len(prompts), -1)
            return {PROMPT_EMBEDDING: embeds.to(self.dtype), POOLED_PROMPT_EMBEDDING: pooled.to(self.dtype), TIME_IDS: time_ids}
        outputs = self.pipeline.encode_prompt(
            prompts, device, 1, negative, negative_prompt=self._negative_prompts(len(prompts)) if negative else None
        )
        return {PROMPT_EMBEDDING: (outputs[1] if negative else outputs[0]).to(self.dtype)}

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a sequence of str, got {prompts!r}")
        return self._encode(list(prompts), negative=False)

    def negative_conditioning(self, batch: int) -> dict[str, torch.Tensor]:
        """The negative prompt's conditioning, repeated ``batch`` times (encoded once per device)."""
        if self._negative is None:
            self._negative = self._encode(["placeholder"], negative=True)
        return {key: value.expand(batch, *value.shape[1:]) for key, value in self._negative.items()}

    # ------------------------------------------------------------------ the network

    def _unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        added = None
        if self.is_xl:
            added = {
                "text_embeds": conditioning[POOLED_PROMPT_EMBEDDING].to(self.dtype),
                "time_ids": conditioning[TIME_IDS].to(self.dtype),
            }
        hidden = conditioning[PROMPT_EMBEDDING].to(self.dtype)
        with self.network_precision():
            return self.unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The UNet's output; with guidance, one call on [negative; conditional] (Ho & Salimans, 2022)."""
        latents = latents.to(self.dtype)
        timesteps = timesteps.to(latents.device)
        if guidance_scale == 1.0:
            return self._unet(latents, timesteps, conditioning)
        negative = self.negative_conditioning(latents.shape[0])
        doubled = {key: torch.cat([negative[key], conditioning[key].to(negative[key].device)]) for key in negative}
        output = self._unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), doubled)
        output_negative, output_conditional = output.chunk(2)
        return output_negative + guidance_scale * (output_conditional - output_negative)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, H, W, 3)`` uint8: the VAE's decoding of ``latents / scaling_factor``."""
        vae_dtype = next(self.vae.parameters()).dtype
        scaled = latents.to(vae_dtype) / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            scaled = scaled + self.vae.config.shift_factor
        pixels = (self.vae.decode(scaled).sample.float() / 2 + 0.5).clamp(0, 1) * 255
        return pixels.round().to(torch.uint8).permute(0, 2, 3, 1)

