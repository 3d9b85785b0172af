"""The shared part of the flow-matching transformer back-ends (Stable Diffusion 3/3.5, FLUX.1).

Both pipelines ship a ``FlowMatchEulerDiscreteScheduler``, so the environment samples them with
:class:`~diffusion_env.samplers.FlowSampler` (its stochastic SDE steps, noise level and window),
built from that scheduler's configuration: its static ``shift``, and, for schedulers with dynamic
shifting (FLUX.1), the shift mu of the image's token count that the pipelines compute
(:meth:`FlowTransformerBackend.resolution_shift`), which the back-end hands to the sampler through
:meth:`FlowTransformerBackend.sampler_options`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from diffusion_env.backends.pipeline_backend import PipelineBackend
from diffusion_env.validation import check_int

#: The attention projections LoRA adapts in a joint-attention transformer: the image stream's
#: (``to_*``) and the text stream's (``add_*_proj``, ``to_add_out``), as Flow-GRPO fine-tunes SD3.5.
TRANSFORMER_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)


class FlowTransformerBackend(PipelineBackend):
    """A base for back-ends over a flow-matching transformer pipeline: the transformer as the
    trained network, its gradient checkpointing, the T5 sequence length and the timestep shift.

    Args:
        pipeline, pipeline_types, frozen, negative_prompt, default_guidance_scale, frozen_dtype:
            as :class:`~diffusion_env.backends.pipeline_backend.PipelineBackend`'s.
        max_sequence_length: the number of T5 tokens every prompt is padded or truncated to.
        gradient_checkpointing: recompute the transformer's activations in the backward pass
            instead of keeping them (less memory, about a third more compute).
    """

    #: The peft target modules of :meth:`agents.GaussianDenoisingPolicy.add_lora` on this back-end.
    lora_target_modules: tuple[str, ...] = TRANSFORMER_LORA_TARGETS
    #: The side of the square of latent pixels that makes one image token (set by :meth:`_set_size`).
    patch_size: int

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        pipeline_types: tuple[type[DiffusionPipeline], ...],
        frozen: tuple[str, ...],
        negative_prompt: str,
        default_guidance_scale: float,
        frozen_dtype: torch.dtype | None,
        max_sequence_length: int,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__(pipeline, pipeline_types, frozen, negative_prompt, default_guidance_scale, frozen_dtype)
        self.transformer = pipeline.transformer
        self.scheduler = pipeline.scheduler
        self.max_sequence_length = check_int("max_sequence_length", max_sequence_length, 1)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def trainable_module(self) -> nn.Module:
        return self.transformer

    def _set_size(
        self, height: int | None, width: int | None, native: int, channels: int, patch_size: int, patch_name: str
    ) -> None:
        """Sets ``height``, ``width`` (pixels; default ``native`` latent pixels times the VAE's
        scale factor f), ``patch_size`` and ``latent_shape`` ``(channels, height / f, width / f)``;
        sizes must be multiples of f times the patch size."""
        scale = self.pipeline.vae_scale_factor
        multiple = scale * patch_size
        self.patch_size = patch_size
        self.height, self.width = self._image_size(
            height, width, native * scale, multiple, f"{multiple} (the VAE's scale factor {scale} times {patch_name} {patch_size})"
        )
        self.latent_shape: tuple[int, int, int] = (channels, self.height // scale, self.width // scale)

    def resolution_shift(self, image_tokens: int) -> float:
        """The dynamic timestep shift mu of an image of ``image_tokens`` tokens, as the pipelines compute it.

        The shifted schedule is t' = e^mu / (e^mu + 1/t - 1), Esser et al. (2024, Sec. 5.3.2)'s
        resolution-dependent shift with factor e^mu; mu is linear in the token count, from
        ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len``
        (the scheduler's configuration; FLUX.1: 0.5 at 256 tokens, 1.15 at 4096).
        """
        config = self.scheduler.config
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        return config.base_shift + slope * (image_tokens - config.base_image_seq_len)

    def sampler_options(self, num_inference_steps: int) -> dict[str, Any]:
        """The sampler options this back-end's schedule needs: mu for a dynamically shifting scheduler."""
        if not self.scheduler.config.get("use_dynamic_shifting", False):
            return {}
        return {"mu": self.resolution_shift(self.image_tokens)}

    @property
    def image_tokens(self) -> int:
        """The number of image tokens the transformer attends over (one per latent patch)."""
        _, height, width = self.latent_shape
        return (height // self.patch_size) * (width // self.patch_size)
