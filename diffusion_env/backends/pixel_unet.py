"""The pixel-space back-end: diffusers' ``UNet2DConditionModel`` over a frozen prompt encoder.

Images are the latents themselves, rescaled from [-1, 1] to uint8. The built-in scene model
(:mod:`diffusion_env.shapes`) and the test-sized ``tiny-random`` model are ``PixelUNetDenoiser`` s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from diffusion_env.backends.base import BackendModule, Conditioning
from diffusion_env.backends.text_encoders import TransformerPromptEncoder

#: The built-in models' one conditioning entry: the prompt encoder's token states.
PROMPT_EMBEDDING = "prompt_embedding"


class PixelUNetDenoiser(BackendModule):
    """A pixel-space text-to-image model: diffusers' ``UNet2DConditionModel`` cross-attending to a
    frozen prompt encoder, sampled by a diffusers scheduler; images are the latents themselves,
    rescaled from [-1, 1] to uint8.

    Args:
        unet: the noise-prediction network; its ``in_channels`` must be 3 (RGB) and its
            ``cross_attention_dim`` the prompt encoder's hidden size.
        scheduler: the scheduler the model was trained with.
        prompt_encoder: turns prompts into token embeddings.
        default_guidance_scale: classifier-free guidance weight used when the caller names none.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        prompt_encoder: TransformerPromptEncoder,
        default_guidance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if unet.config.in_channels != 3 or unet.config.out_channels != 3:
            raise ValueError(
                f"a pixel-space UNet needs 3 input and output channels (RGB), got "
                f"{unet.config.in_channels} and {unet.config.out_channels}"
            )
        if unet.config.cross_attention_dim != prompt_encoder.hidden_size:
            raise ValueError(
                f"UNet cross_attention_dim={unet.config.cross_attention_dim} does not match the "
                f"prompt encoder's hidden size {prompt_encoder.hidden_size}"
            )
        self.unet = unet
        self.scheduler = scheduler
        # Kept as a plain attribute, not a submodule: the frozen encoder is shared by every
        # back-end of the process and must not be moved or cast with the UNet.
        self.prompt_encoder = prompt_encoder
        self.default_guidance_scale = float(default_guidance_scale)
        size = unet.config.sample_size
        self.latent_shape: tuple[int, int, int] = (3, size, size)
        self.conditioning_shapes: dict[str, tuple[int, ...]] = {
            PROMPT_EMBEDDING: (prompt_encoder.max_length, prompt_encoder.hidden_size)
        }
        self.prompt_encoder.to(self.device, self.dtype)

    def _moved(self) -> None:
        # The prompt cache follows the UNet.
        self.prompt_encoder.to(self.device, self.dtype)

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {PROMPT_EMBEDDING: self.prompt_encoder(prompts)}

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The UNet's output; classifier-free guidance with the empty prompt as the unconditional one."""
        latents = latents.to(self.dtype)
        prompt_embeds = conditioning[PROMPT_EMBEDDING].to(self.dtype)
        if guidance_scale == 1.0:
            with self.network_precision():
                return self.unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
        # One network call on the doubled batch [unconditional; conditional], as diffusers' pipelines do.
        batch = latents.shape[0]
        unconditional = self.prompt_encoder([""]).expand(batch, -1, -1)
        with self.network_precision():
            output = self.unet(
                torch.cat([latents, latents]),
                torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([unconditional, prompt_embeds]),
            ).sample
        output_uncond, output_cond = output.chunk(2)
        return output_uncond + guidance_scale * (output_cond - output_uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = (latents.float() / 2 + 0.5).clamp(0, 1) * 255
        return pixels.round().to(torch.uint8).permute(0, 2, 3, 1)

    def trainable_module(self) -> nn.Module:
        return self.unet


def tiny_random_denoiser(sample_size: int = 16, seed: int = 0) -> PixelUNetDenoiser:
    """A test-sized, randomly initialised (seeded) pixel UNet over the shipped MiniLM encoder.

    Its samples are noise, but every code path (guidance, scheduling, decoding, training) is the
    real one; tests and benchmarks of the machinery run on it in seconds on a CPU.
    """
    prompt_encoder = TransformerPromptEncoder(max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=prompt_encoder.hidden_size,
            attention_head_dim=8,
        )
    # Stable Diffusion's sampler settings: steps_offset=1 with set_alpha_to_one=False keeps
    # sigma_t > 0 on the last DDIM step.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return PixelUNetDenoiser(unet, scheduler, prompt_encoder, default_guidance_scale=1.0)
