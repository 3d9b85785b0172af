"""Stable Diffusion 3/3.5 as a back-end: a ``StableDiffusion3Pipeline``'s MMDiT transformer, VAE and text encoders.

The back-end steps the pipeline's ``SD3Transformer2DModel`` (Esser et al., 2024) on latents
``(C, H/f, W/f)`` (f the VAE's scale factor; the transformer cuts them into patches itself) and
decodes with the VAE only when an image is needed (the last step, ``render``). Prompts are
encoded by the pipeline's own ``encode_prompt``; the conditioning entries of the observation are

- ``"prompt_embedding"`` ``(77 + L, D)``: the two CLIP encoders' penultimate states (concatenated
  and zero-padded to the T5 width D) followed by the L = ``max_sequence_length`` T5 token states
  (zeros for a pipeline without T5, as the pipeline does);
- ``"pooled_prompt_embedding"`` ``(P,)``: both CLIP encoders' projections, concatenated.

Classifier-free guidance is the pipeline's: [negative; conditional] in one batch, the negative
prompt encoded like a prompt. Sampling is the flow SDE of the checkpoint's
``FlowMatchEulerDiscreteScheduler`` (:mod:`diffusion_env.backends.flow_matching`).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from diffusion_env.backends.base import Conditioning
from diffusion_env.backends.flow_matching import FlowTransformerBackend
from diffusion_env.backends.pixel_unet import PROMPT_EMBEDDING
from diffusion_env.backends.stable_diffusion import POOLED_PROMPT_EMBEDDING


class StableDiffusion3Backend(FlowTransformerBackend):
    """A ``StableDiffusion3Pipeline`` (SD3, SD3.5) as a :class:`~diffusion_env.backends.DenoiserBackend`.

    Args:
        pipeline: the pipeline (its transformer, VAE and text encoders become this module's
            submodules; its scheduler's configuration gives the flow sampler).
        height, width: the image size in pixels, multiples of the VAE's scale factor times the
            transformer's patch size (16 for the released checkpoints; default: the transformer's
            ``sample_size`` times the VAE's factor, 1024 for SD3/SD3.5).
        negative_prompt: the prompt of the unconditional branch of classifier-free guidance.
        default_guidance_scale: the guidance weight used when the environment names none (7.0,
            the pipeline's default; SD3.5 Large's model card uses 3.5, Flow-GRPO 4.5 on SD3.5 Medium).
        max_sequence_length: the number of T5 tokens (256, the pipeline's default).
        frozen_dtype: the dtype of the VAE and the text encoders (default: the transformer's).
        gradient_checkpointing: recompute the transformer's activations in the backward pass.
    """

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str = "",
        default_guidance_scale: float = 7.0,
        max_sequence_length: int = 256,
        frozen_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        # Imported here: the pipeline classes load their text and image models' code.
        from diffusers import StableDiffusion3Pipeline

        super().__init__(
            pipeline, (StableDiffusion3Pipeline,), ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
            negative_prompt, default_guidance_scale, frozen_dtype, max_sequence_length, gradient_checkpointing,
        )
        config = self.transformer.config
        self._set_size(height, width, config.sample_size, config.in_channels, config.patch_size, "the transformer's patch size")
        if config.pos_embed_max_size is not None:
            # The transformer's position embedding is cropped from a grid of this many patches a side.
            largest = config.pos_embed_max_size * config.patch_size * pipeline.vae_scale_factor
            for name, size in (("height", self.height), ("width", self.width)):
                if size > largest:
                    raise ValueError(f"{name}={size}; allowed: at most {largest}, the transformer's position embedding's extent")
        self.conditioning_shapes: dict[str, tuple[int, ...]] = {
            PROMPT_EMBEDDING: (pipeline.tokenizer_max_length + self.max_sequence_length, config.joint_attention_dim),
            POOLED_PROMPT_EMBEDDING: (config.pooled_projection_dim,),
        }

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {PROMPT_EMBEDDING: embeds.to(self.dtype), POOLED_PROMPT_EMBEDDING: pooled.to(self.dtype)}

    def _transformer(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        with self.network_precision():
            return self.transformer(
                hidden_states=latents,
                # The pipeline conditions on the scheduler's float32 timesteps in [0, 1000].
                timestep=timesteps.to(torch.float32),
                encoder_hidden_states=conditioning[PROMPT_EMBEDDING].to(self.dtype),
                pooled_projections=conditioning[POOLED_PROMPT_EMBEDDING].to(self.dtype),
                return_dict=False,
            )[0]

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The velocity v = eps - x_0 the transformer predicts, with classifier-free guidance of
        weight ``guidance_scale``."""
        return self._guided(self._transformer, latents, timesteps, conditioning, guidance_scale)
