"""Test-sized Stable Diffusion and SDXL pipelines, built offline from configs: ``tiny-sd``, ``tiny-sdxl``.

Every component is the real diffusers or transformers class (UNet, VAE, CLIP text encoders,
CLIP tokenizer) at a few thousand parameters and random (seeded) weights; the tokenizer's
vocabulary is written here (single characters, no merges), so nothing is downloaded. The
schedulers are the ones the real checkpoints ship (PNDM for Stable Diffusion 1.x, Euler for
SDXL). Their samples are noise, but every code path of the Stable Diffusion back-end is the real
one: tests and CPU benchmarks of the machinery run on them in seconds.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_LENGTH = 77
HIDDEN = 32


def character_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose tokens are single characters (each also as a word end)."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = string.ascii_lowercase + string.digits + ",.!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(c + "</w>" for c in characters)]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH)


def text_config(tokenizer: CLIPTokenizer, **changes: Any) -> CLIPTextConfig:
    """A CLIP text encoder's configuration over ``tokenizer``'s vocabulary: two layers of width 32,
    unless ``changes`` say otherwise (they replace any entry, e.g. a real encoder's width and depth)."""
    shape = {"hidden_size": HIDDEN, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    return CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "max_position_embeddings": MAX_LENGTH, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 1, **shape, **changes,
    })


def tiny_vae(**changes: Any) -> AutoencoderKL:
    """A VAE of scale factor 2 and 4 latent channels."""
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        **changes,
    )


def _unet(**changes: Any) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, **changes,
    )


def tiny_stable_diffusion(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A Stable Diffusion 1.x pipeline of 16x16 images (8x8x4 latents)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = character_tokenizer(folder / "tokenizer-files")
        unet = _unet(cross_attention_dim=HIDDEN)
        text_encoder = CLIPTextModel(text_config(tokenizer))
        vae = tiny_vae()
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_stable_diffusion_xl(folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL pipeline of 16x16 images: two text encoders, pooled embeddings and time ids."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = character_tokenizer(folder / "tokenizer-files")
        unet = _unet(
            cross_attention_dim=2 * HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + HIDDEN,
        )
        text_encoder = CLIPTextModel(text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, projection_dim=HIDDEN))
        vae = tiny_vae()
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def tiny_sd_backend(xl: bool = False, **options: Any) -> Any:
    """The registered ``tiny-sd`` (``xl=False``) and ``tiny-sdxl`` models as back-ends; ``options``
    are :class:`~diffusion_env.backends.stable_diffusion.StableDiffusionBackend`'s."""
    from diffusion_env.backends.stable_diffusion import StableDiffusionBackend

    # The tokenizer reads its vocabulary files when it is built and keeps it in memory.
    with tempfile.TemporaryDirectory() as folder:
        pipeline = (tiny_stable_diffusion_xl if xl else tiny_stable_diffusion)(Path(folder))
    return StableDiffusionBackend(pipeline, **options)
