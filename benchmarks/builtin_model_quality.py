"""Quality of the built-in model, read by the analytic scene parser, at the env's default sampler.

Samples images for train and held-out prompts (the environment's default sampler of the model's
scheduler, 20 steps, the model's default guidance: DDIM with eta 1 for ``shapes32``, Flow-GRPO's
SDE with noise level 0.7 for its flow-matching twin ``shapes32-flow``), parses them with ``scenes.parse_scenes`` and prints the fraction of samples whose
background colour, shape colour, shape kind, count and size match the prompt; saves a grid of
samples per prompt.

    python benchmarks/builtin_model_quality.py --samples 160 --out outputs/quality [--model shapes32-flow]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffusion_env.shapes import scenes
from diffusion_env.samplers import make_sampler
from diffusion_env.shapes.model import FLOW_WEIGHTS_DIR, WEIGHTS_DIR, load_builtin_denoiser
from diffusion_env.shapes.pretrain import evaluate, save_grid


#: The built-in models' weight folders.
MODELS = {"shapes32": WEIGHTS_DIR, "shapes32-flow": FLOW_WEIGHTS_DIR}


def prompts_of(split: list[tuple[str, dict]], count: int, seed: int) -> list[tuple[str, dict]]:
    order = np.random.default_rng(seed).permutation(len(split))[:count]
    return [split[i] for i in order]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=160, help="prompts per split (one image each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/quality"))
    parser.add_argument("--model", choices=sorted(MODELS), default="shapes32", help="the built-in model or its flow twin")
    args = parser.parse_args(argv)
    try:
        denoiser = load_builtin_denoiser(MODELS[args.model])
    except FileNotFoundError as error:
        parser.error(str(error))
    args.out.mkdir(parents=True, exist_ok=True)
    sampler = make_sampler(denoiser.scheduler, 20)
    print(f"{args.model}: {type(sampler).__name__} of {type(denoiser.scheduler).__name__}, 20 steps, "
          f"guidance {denoiser.default_guidance_scale}")
    print(f"{'split':>9} " + " ".join(f"{k:>10}" for k in ("background", "color", "shape", "count", "size", "all")))
    for name, split in (("train", scenes.train_prompts()), ("held-out", scenes.heldout_prompts())):
        prompts = prompts_of(split, args.samples, args.seed)
        agreement, images = evaluate(denoiser, prompts, denoiser.default_guidance_scale, seed=args.seed)
        print(f"{name:>9} " + " ".join(f"{agreement[k]:>10.3f}" for k in ("background", "color", "shape", "count", "size", "all")))
        save_grid(images[:32], args.out / f"samples_{name}.png")
        (args.out / f"prompts_{name}.txt").write_text("\n".join(p for p, _ in prompts[:32]))
    print(f"grids saved in {args.out}")


if __name__ == "__main__":
    main()
