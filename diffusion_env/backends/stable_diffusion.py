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
from typing import Any

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from torch import nn

from diffusion_env.backends.base import Conditioning
from diffusion_env.backends.pipeline_backend import PipelineBackend
from diffusion_env.backends.pixel_unet import PROMPT_EMBEDDING

logger = logging.getLogger(__name__)

POOLED_PROMPT_EMBEDDING = "pooled_prompt_embedding"
TIME_IDS = "time_ids"

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


class StableDiffusionBackend(PipelineBackend):
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

        super().__init__(
            pipeline, (StableDiffusionPipeline, StableDiffusionXLPipeline), ("vae", "text_encoder", "text_encoder_2"),
            negative_prompt, default_guidance_scale, frozen_dtype,
        )
        self.is_xl = isinstance(pipeline, StableDiffusionXLPipeline)
        self.unet = pipeline.unet
        self.scheduler = ddim_from(pipeline.scheduler)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        scale = pipeline.vae_scale_factor
        native = self.unet.config.sample_size * scale
        self.height, self.width = self._image_size(height, width, native, scale, f"the VAE's scale factor {scale}")
        self.latent_shape: tuple[int, int, int] = (self.unet.config.in_channels, self.height // scale, self.width // scale)
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

    def trainable_module(self) -> nn.Module:
        return self.unet

    # ------------------------------------------------------------------ prompts

    def _negative_prompts(self, count: int) -> list[str] | None:
        # None for the empty negative prompt, as the pipelines' own default: SDXL then uses zeros
        # (force_zeros_for_empty_prompt), Stable Diffusion 1.x/2.x encodes "".
        return [self.negative_prompt] * count if self.negative_prompt else None

    def _encode(self, prompts: list[str], negative: bool = False) -> dict[str, torch.Tensor]:
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

    def _encode_negative(self) -> dict[str, torch.Tensor]:
        # The pipelines' own negative branch: SDXL's zeros for the empty prompt need it.
        return self._encode(["placeholder"], negative=True)

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
        """The UNet's output, with classifier-free guidance of weight ``guidance_scale``."""
        return self._guided(self._unet, latents, timesteps, conditioning, guidance_scale)
