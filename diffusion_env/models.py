"""Denoiser back-ends: the protocol the environment and the agents need, and the built-in models.

A back-end bundles what one text-to-image diffusion model needs to be an MDP: a prompt encoder,
a conditional noise-prediction network with classifier-free guidance, the scheduler that defines
its sampler, and a decoder from latents to images. ``PixelUNetDenoiser`` is the pixel-space
implementation over a diffusers ``UNet2DConditionModel``; latent-space pipelines such as Stable
Diffusion implement the same protocol with a VAE decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from diffusion_env.text_encoders import TransformerPromptEncoder


@runtime_checkable
class DenoiserBackend(Protocol):
    """What a text-to-image diffusion model must provide to be stepped as an MDP.

    Attributes:
        latent_shape: ``(C, H, W)`` of one latent.
        scheduler: the diffusers scheduler whose config defines the sampler.
        prompt_embedding_shape: ``(L, D)`` of one prompt's embedding.
        default_guidance_scale: the classifier-free guidance weight the model is meant for.
        device, dtype: where and in what precision the network runs.
    """

    latent_shape: tuple[int, int, int]
    scheduler: SchedulerMixin
    prompt_embedding_shape: tuple[int, int]
    default_guidance_scale: float
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings ``(B, L, D)`` on ``device`` in ``dtype``."""
        ...

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The network's output for ``latents`` ``(B, C, H, W)`` at ``timesteps`` ``(B,)``.

        The output is in the scheduler's ``prediction_type`` parametrisation (the noise eps for an
        epsilon-prediction model), with classifier-free guidance applied when
        ``guidance_scale != 1``: out = out_uncond + w * (out_cond - out_uncond).
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, H, W, 3)`` uint8 on ``device`` from latents ``(B, C, H, W)``."""
        ...

    def trainable_module(self) -> nn.Module:
        """The network whose parameters a policy fine-tunes (the UNet)."""
        ...

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DenoiserBackend:
        """Moves the back-end (in place, like ``nn.Module.to``) and returns it."""
        ...


class PixelUNetDenoiser(nn.Module):
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
        self.prompt_embedding_shape: tuple[int, int] = (
            prompt_encoder.max_length,
            prompt_encoder.hidden_size,
        )
        self.prompt_encoder.to(self.device, self.dtype)

    # diffusers' ModelMixin.device/dtype scan the whole module (about 0.6 ms each), and the MDP asks
    # several times per step; the first parameter answers the same for a model on one device.
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args, **kwargs) -> PixelUNetDenoiser:
        # nn.Module.to/cuda/half all funnel through _apply; the prompt cache follows the UNet.
        super()._apply(fn, *args, **kwargs)
        self.prompt_encoder.to(self.device, self.dtype)
        return self

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.prompt_encoder(prompts)

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        latents = latents.to(self.dtype)
        prompt_embeds = prompt_embeds.to(self.dtype)
        if guidance_scale == 1.0:
            return self.unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
        # One network call on the doubled batch [unconditional; conditional], as diffusers' pipelines do.
        batch = latents.shape[0]
        unconditional = self.encode_prompts([""]).expand(batch, -1, -1)
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


def shapes32_denoiser() -> DenoiserBackend:
    """The built-in 32x32 scene model with its shipped weights (see :mod:`diffusion_env.builtin_model`)."""
    from diffusion_env.builtin_model import load_builtin_denoiser  # it imports this module

    return load_builtin_denoiser()


MODELS: dict[str, Callable[[], DenoiserBackend]] = {
    "shapes32": shapes32_denoiser,
    "tiny-random": tiny_random_denoiser,
}


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
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; allowed: {sorted(MODELS)} or a DenoiserBackend object")
        backend = MODELS[model]()
    elif isinstance(model, DenoiserBackend):
        backend = model
    else:
        raise TypeError(
            f"model must be a registered name {sorted(MODELS)} or an object implementing "
            f"DenoiserBackend, got {type(model).__name__}"
        )
    if device is not None or dtype is not None:
        backend.to(device=device, dtype=dtype)
    return backend
