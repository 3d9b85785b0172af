"""Pipelines of a real model's shape with random weights, built offline: for GPU benchmarks without downloads.

    python benchmarks/shaped_pipelines.py --shape sd15 --out /tmp/sd15-shaped

- ``sd15``: Stable Diffusion 1.5's architecture (the UNet's 860 M parameters, its VAE, a CLIP
  text encoder of its width and depth with a character-level vocabulary, its PNDM scheduler);
- ``sd35-medium``: Stable Diffusion 3.5 Medium's (the MMDiT transformer's 2.24 B parameters: 24
  blocks of 24 heads, dual attention in the first 13, query-key RMS norm; its 16-channel VAE, CLIP-L
  and CLIP-G text encoders of their widths and depths, its scheduler with shift 3), without the
  T5-XXL encoder (4.7 B parameters, run once per prompt, not per step): the pipeline fills its 256
  token states with zeros, so the transformer sees the sequence it sees with T5. The transformer's
  default size is 64 latents a side, so the folder samples 512x512 images (Flow-GRPO's training
  size) unless given ``height``/``width``;
- ``tiny``: the test-sized one of ``tiny-sd``.

The weights are random (seeded), so samples are noise, but time and memory per step are those of
the real model. The folder is a pipeline folder: ``--model FOLDER`` of ``env_throughput.py``,
``train_throughput.py`` and ``sync_check.py`` loads it. Those scripts also take ``--model
shaped:NAME`` (e.g. ``shaped:sd35-medium``), which builds the pipeline in memory, its networks
directly on the benchmark's device: no folder is written or read (the SD3.5-Medium-shaped one
holds 13 GB in float32, minutes of disk on each side).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffusion_env.backends import DenoiserBackend, make_denoiser
from diffusion_env.backends.tiny_pipelines import character_tokenizer, text_config, tiny_stable_diffusion

#: Stable Diffusion 1.5's UNet beyond diffusers' defaults (which are the 1.x layout), its VAE and
#: its text encoder (CLIP ViT-L/14's text tower).
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
}


def sd15_shaped(folder: Path, seed: int = 0, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture with random weights (seeded), its networks built on
    ``device``; its tokenizer is written to ``folder``."""
    tokenizer = character_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(tokenizer, **SD15_TEXT))
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


#: Stable Diffusion 3.5 Medium's transformer (its sample size halved: 512-pixel images by default),
#: VAE and CLIP-L / CLIP-G text towers.
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 64, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
SD35_MEDIUM_VAE = {
    **SD15_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
    "scaling_factor": 1.5305, "shift_factor": 0.0609,
}
CLIP_L_TEXT = {**SD15_TEXT, "projection_dim": 768}
CLIP_G_TEXT = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}


def sd35_medium_shaped(folder: Path, seed: int = 0, device: torch.device | str = "cpu") -> StableDiffusion3Pipeline:
    """Stable Diffusion 3.5 Medium's architecture without T5, random weights (seeded), its networks
    built on ``device``; its tokenizer is written to ``folder``."""
    tokenizer = character_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoders = [CLIPTextModelWithProjection(text_config(tokenizer, **shape)) for shape in (CLIP_L_TEXT, CLIP_G_TEXT)]
        transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(**SD35_MEDIUM_VAE)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def denoiser(pipeline: DiffusionPipeline) -> tuple[str, torch.nn.Module]:
    """The pipeline's denoising network and what it is (``"UNet"`` or ``"transformer"``)."""
    return ("UNet", pipeline.unet) if hasattr(pipeline, "unet") else ("transformer", pipeline.transformer)


def tiny_shaped(folder: Path, seed: int = 0, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """The test-sized pipeline of ``tiny-sd``, built on the CPU (``make_denoiser`` moves it)."""
    return tiny_stable_diffusion(folder, seed=seed)


SHAPES = {"sd15": sd15_shaped, "sd35-medium": sd35_medium_shaped, "tiny": tiny_shaped}
SHAPED = "shaped:"


def benchmark_denoiser(model: str, device: torch.device | str) -> DenoiserBackend:
    """The back-end of a benchmark's ``--model`` on ``device``: ``shaped:NAME`` builds that shape's
    pipeline in memory, its networks on ``device``; any other name goes to ``make_denoiser`` as it is.

    Raises:
        ValueError: for ``shaped:`` with a shape that is not one of :data:`SHAPES`, and what
            ``make_denoiser`` raises for the model.
    """
    if not model.startswith(SHAPED):
        return make_denoiser(model, device=device)
    shape = model.removeprefix(SHAPED)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in --model {model!r}; allowed: " + ", ".join(SHAPED + name for name in sorted(SHAPES)))
    with tempfile.TemporaryDirectory() as folder:  # the tokenizer is read from its files once, when built
        return make_denoiser(SHAPES[shape](Path(folder), seed=0, device=device), device=device)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="sd15")
    parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline = SHAPES[args.shape](args.out, seed=args.seed)
    pipeline.save_pretrained(args.out)
    network, module = denoiser(pipeline)
    parameters = sum(p.numel() for p in module.parameters())
    print(f"{args.shape}-shaped pipeline ({network} {parameters / 1e6:.1f} M parameters, random weights) in {args.out}, "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
