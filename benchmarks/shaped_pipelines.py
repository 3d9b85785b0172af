"""Pipelines of a real model's shape with random weights, built offline: for GPU benchmarks without downloads.

    python benchmarks/shaped_pipelines.py --shape sd15 --out /tmp/sd15-shaped

``sd15`` is Stable Diffusion 1.5's architecture (the UNet's 860 M parameters, its VAE, a CLIP
text encoder of its width and depth with a character-level vocabulary, its PNDM scheduler),
``tiny`` the test-sized one of ``tiny-sd``. The weights are random (seeded), so samples are noise,
but time and memory per step are those of the real model. The folder is a pipeline folder:
``--model FOLDER`` of ``env_throughput.py``, ``train_throughput.py`` and ``sync_check.py`` loads it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion_env.backends.tiny_pipelines import character_tokenizer, tiny_stable_diffusion

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


def sd15_shaped(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture with random weights (seeded); its tokenizer is written to ``folder``."""
    tokenizer = character_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                           pad_token_id=1, **SD15_TEXT)
        )
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


SHAPES = {"sd15": sd15_shaped, "tiny": tiny_stable_diffusion}


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
    parameters = sum(p.numel() for p in pipeline.unet.parameters())
    print(f"{args.shape}-shaped pipeline (UNet {parameters / 1e6:.1f} M parameters, random weights) in {args.out}, "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
