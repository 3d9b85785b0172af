"""Test-sized Stable Diffusion 3 and FLUX.1 pipelines, built offline from configs: ``tiny-sd3``, ``tiny-flux``.

Every component is the real diffusers or transformers class (``SD3Transformer2DModel`` with
SD3.5's query-key normalisation and a dual-attention block, ``FluxTransformer2DModel`` with a
guidance embedding as FLUX.1-dev has, a VAE with a shift factor, CLIP and T5 text encoders) at a
few thousand parameters and random (seeded) weights. The tokenizers' vocabularies are written here
(single characters: a CLIP BPE without merges, a T5 unigram model), so nothing is downloaded. The
schedulers are configured as the released checkpoints' (SD3.5: a static shift of 3; FLUX.1:
dynamic shifting). Their samples are noise, but every code path of the back-ends is the real one.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from diffusion_env.backends.base import DenoiserBackend
from diffusion_env.backends.tiny_pipelines import HIDDEN, character_tokenizer, text_config, tiny_vae

#: The T5 encoder's width, which is the transformers' text width (``joint_attention_dim``).
T5_WIDTH = 64
#: The image size of the registered ``tiny-sd3`` and ``tiny-flux``: 8x8x4 latents.
SIZE = 16


def character_t5_tokenizer() -> T5Tokenizer:
    """A T5 unigram tokenizer whose pieces are single characters, each also as a word start."""
    characters = string.ascii_lowercase + string.digits + ",.!?'-"
    # Word-start pieces score higher, so that a word's first character is taken with its marker.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(c, -2.0) for c in characters] + [("\u2581" + c, -1.0) for c in characters]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=16, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def tiny_sd3(folder: Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3.5-style pipeline of 16x16 images: 8x8x4 latents, 2x2 patches, two CLIP encoders and T5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = character_tokenizer(folder / "tokenizer-files")
        t5_tokenizer = character_t5_tokenizer()
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
            pooled_projection_dim=2 * HIDDEN, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
        )
        text_encoder = CLIPTextModelWithProjection(text_config(tokenizer, projection_dim=HIDDEN))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, projection_dim=HIDDEN))
        text_encoder_3 = _t5(t5_tokenizer)
        vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )


def tiny_flux(folder: Path, seed: int = 0) -> FluxPipeline:
    """A FLUX.1-dev-style pipeline: 4-channel latents packed into 2x2 tokens, a guidance embedding,
    CLIP and T5 encoders, a dynamically shifting scheduler (its default image size is the
    pipeline's, 256 pixels: give ``height``/``width``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = character_tokenizer(folder / "tokenizer-files")
        t5_tokenizer = character_t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=HIDDEN, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        text_encoder = CLIPTextModel(text_config(tokenizer))
        text_encoder_2 = _t5(t5_tokenizer)
        vae = tiny_vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer,
    )


def tiny_flow_backend(family: str, **options: Any) -> DenoiserBackend:
    """The registered ``tiny-sd3`` (``family="sd3"``) and ``tiny-flux`` (``"flux"``) models as
    back-ends of 16x16 images; ``options`` are the back-end class's."""
    from diffusion_env.backends.flux import FluxBackend
    from diffusion_env.backends.sd3 import StableDiffusion3Backend

    builders = {"sd3": (tiny_sd3, StableDiffusion3Backend), "flux": (tiny_flux, FluxBackend)}
    if family not in builders:
        raise ValueError(f"family={family!r}; allowed: {sorted(builders)}")
    build, backend = builders[family]
    options = {"height": SIZE, "width": SIZE, **options}
    # The CLIP tokenizer reads its vocabulary files when it is built and keeps it in memory.
    with tempfile.TemporaryDirectory() as folder:
        pipeline = build(Path(folder))
    return backend(pipeline, **options)
