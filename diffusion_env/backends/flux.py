"""FLUX.1 as a back-end: a ``FluxPipeline``'s transformer, VAE and text encoders (CLIP and T5).

The observation holds the latent as the VAE makes it, ``(C, H/f, W/f)`` (f the VAE's scale
factor): the back-end packs it into the transformer's token sequence on every call and unpacks
the output (:func:`pack_latents`, :func:`unpack_latents`: each 2x2 patch of latent pixels is one
token of 4C values, ordered row by row), so actions, log-likelihoods and renders are all in the
unpacked shape. Image tokens carry their position ids (0, row, column), text tokens zeros.

The conditioning entries of the observation are ``"prompt_embedding"`` ``(L, D)``, the T5 token
states (L = ``max_sequence_length``), and ``"pooled_prompt_embedding"`` ``(P,)``, CLIP's pooled
output. Guidance is FLUX.1's: FLUX.1-dev is guidance-distilled, so the environment's
``guidance_scale`` is the value of its guidance embedding, one network call a step; FLUX.1-schnell
has no guidance embedding and ignores it. True classifier-free guidance (two branches, the
negative prompt's and the prompt's) is off by default, as the pipeline has it, and on for
``true_cfg_scale > 1``.

The schedule is the pipeline's: sigmas evenly spaced from 1 to 1/K, shifted by the dynamic shift
mu of the image's token count (:meth:`FluxBackend.sampler_options`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from diffusion_env.backends.base import Conditioning
from diffusion_env.backends.flow_matching import FlowTransformerBackend
from diffusion_env.backends.pixel_unet import PROMPT_EMBEDDING
from diffusion_env.backends.stable_diffusion import POOLED_PROMPT_EMBEDDING
from diffusion_env.validation import check_float, check_int


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` as FLUX's token sequence ``(B, H/2 * W/2, 4C)``: token (i, j) holds
    the 2x2 patch at rows 2i, 2i+1 and columns 2j, 2j+1, channel-major."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: tokens ``(B, H/2 * W/2, 4C)`` as latents ``(B, C, H, W)``."""
    batch, _, values = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, values // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, values // 4, height, width)


@functools.lru_cache(maxsize=8)
def image_ids(height: int, width: int) -> torch.Tensor:
    """The position ids ``(H/2 * W/2, 3)`` of the packed tokens of an ``H x W`` latent: (0, row, column)."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)


class FluxBackend(FlowTransformerBackend):
    """A ``FluxPipeline`` (FLUX.1-dev, FLUX.1-schnell) as a :class:`~diffusion_env.backends.DenoiserBackend`.

    Args:
        pipeline: the pipeline (its transformer, VAE and text encoders become this module's
            submodules; its scheduler's configuration gives the flow sampler).
        height, width: the image size in pixels, multiples of twice the VAE's scale factor (16
            for the released checkpoints; default: the pipeline's, 1024).
        negative_prompt: the prompt of true classifier-free guidance's negative branch.
        default_guidance_scale: the guidance embedding's value when the environment names none
            (3.5, the pipeline's default for FLUX.1-dev; FLUX.1-schnell ignores it).
        true_cfg_scale: the weight (>= 1) of true classifier-free guidance; 1 (the default) turns it off.
        max_sequence_length: the number of T5 tokens (512, the pipeline's default; 256 is the
            most FLUX.1-schnell was trained with).
        frozen_dtype: the dtype of the VAE and the text encoders (default: the transformer's).
        gradient_checkpointing: recompute the transformer's activations in the backward pass.
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = "",
        default_guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        max_sequence_length: int = 512,
        frozen_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        # Imported here: the pipeline classes load their text and image models' code.
        from diffusers import FluxPipeline

        super().__init__(
            pipeline, (FluxPipeline,), ("vae", "text_encoder", "text_encoder_2"),
            negative_prompt, default_guidance_scale, frozen_dtype, max_sequence_length, gradient_checkpointing,
        )
        self.true_cfg_scale = check_float("true_cfg_scale", true_cfg_scale, 1.0)
        config = self.transformer.config
        # The packing's 2x2 patches are the tokens (the transformer's own patch size is 1).
        self._set_size(height, width, pipeline.default_sample_size, config.in_channels // 4, 2, "the packing's patch size")
        self.conditioning_shapes: dict[str, tuple[int, ...]] = {
            PROMPT_EMBEDDING: (self.max_sequence_length, config.joint_attention_dim),
            POOLED_PROMPT_EMBEDDING: (config.pooled_projection_dim,),
        }

    def sampler_options(self, num_inference_steps: int) -> dict[str, Any]:
        """The pipeline's schedule: sigmas 1, ..., 1/K evenly spaced (before the shift) and mu."""
        steps = check_int("num_inference_steps", num_inference_steps, 1)
        return {**super().sampler_options(steps), "sigmas": np.linspace(1.0, 1.0 / steps, steps)}

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {PROMPT_EMBEDDING: embeds.to(self.dtype), POOLED_PROMPT_EMBEDDING: pooled.to(self.dtype)}

    def _transformer(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, guidance: float
    ) -> torch.Tensor:
        batch, _, height, width = latents.shape
        hidden = conditioning[PROMPT_EMBEDDING].to(self.dtype)
        guidance_values = None
        if self.transformer.config.guidance_embeds:
            guidance_values = torch.full((batch,), guidance, dtype=torch.float32, device=latents.device)
        with self.network_precision():
            tokens = self.transformer(
                hidden_states=pack_latents(latents),
                # The pipeline gives the timestep in [0, 1]; the transformer scales it by 1000 again.
                timestep=timesteps.to(self.dtype) / 1000,
                guidance=guidance_values,
                pooled_projections=conditioning[POOLED_PROMPT_EMBEDDING].to(self.dtype),
                encoder_hidden_states=hidden,
                txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=self.dtype),
                img_ids=image_ids(height, width).to(latents.device, self.dtype),
                return_dict=False,
            )[0]
        return unpack_latents(tokens, height, width)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The velocity v = eps - x_0 the transformer predicts ``(B, C, H, W)``, its guidance
        embedding set to ``guidance_scale``; with true classifier-free guidance of weight
        ``true_cfg_scale`` when that is not 1."""
        network = functools.partial(self._transformer, guidance=guidance_scale)
        return self._guided(network, latents, timesteps, conditioning, self.true_cfg_scale)
