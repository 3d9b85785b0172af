"""Roll out the model's own sampler through the vector environment and save what it drew.

    python -m agents.rollout --num-envs 16 --out outputs/rollout
    diffusion-env-rollout --model shapes32 --prompt-file my_prompts.txt

Writes ``samples.png`` (a grid of the final images), ``samples.json`` (each image's prompt, reward
and log-likelihood of its trajectory) and prints the mean reward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import torch
from PIL import Image
from tqdm import tqdm

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.policy import GaussianDenoisingPolicy
from diffusion_env.images import image_grid
from diffusion_env.prompts import PromptSet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--num-envs", type=int, default=16, help="images sampled in one batch")
    parser.add_argument("--num-inference-steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--model", default=None, help="registered model name (default: the environment's)")
    parser.add_argument("--reward", default="jpeg_compressibility", help="registered reward name")
    parser.add_argument("--prompts", default="scenes_train", help="registered prompt-set name")
    parser.add_argument("--prompt-file", type=Path, default=None, help="text file of prompts, one a line (replaces --prompts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, initial noise and policy noise")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--out", type=Path, default=Path("outputs/rollout"), help="output directory")
    parser.add_argument("--upscale", type=int, default=4, help="pixel repetition of the saved grid")
    return parser


def rollout(args: argparse.Namespace) -> dict[str, float]:
    """Runs the rollout ``args`` describe; returns the mean and standard deviation of the reward."""
    model_kwargs = {} if args.model is None else {"model": args.model}
    prompts = PromptSet.from_file(args.prompt_file) if args.prompt_file is not None else args.prompts
    env = gym.make_vec(
        "DiffusionDenoise-v0",
        num_envs=args.num_envs,
        reward=args.reward,
        prompts=prompts,
        num_inference_steps=args.num_inference_steps,
        device=args.device,
        array_type="torch",
        **model_kwargs,
    )
    policy = GaussianDenoisingPolicy.from_env(env)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    obs, _ = env.reset(seed=args.seed)
    log_likelihood = torch.zeros(args.num_envs, device=args.device)
    terminated = torch.zeros(args.num_envs, dtype=torch.bool)
    with torch.no_grad(), tqdm(total=args.num_inference_steps, desc="denoising") as progress:
        while not bool(terminated.all()):
            action, step_log_likelihood = policy.sample_with_log_prob(obs, generator=generator)
            log_likelihood += step_log_likelihood
            obs, rewards, terminated, _, step_info = env.step(action)
            progress.update()

    images = step_info["image"].cpu().numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(image_grid(images, columns=min(8, args.num_envs)))
    grid.resize((grid.width * args.upscale, grid.height * args.upscale), Image.NEAREST).save(args.out / "samples.png")
    details = {k: v for k, v in step_info["reward_details"].items() if not k.startswith("_")}
    records = [
        {
            "prompt": prompt,
            "reward": reward,
            "log_likelihood": trajectory_log_likelihood,
            **{name: float(values[i]) for name, values in details.items()},
        }
        for i, (prompt, reward, trajectory_log_likelihood) in enumerate(
            zip(step_info["prompt"], rewards.tolist(), log_likelihood.tolist())
        )
    ]
    (args.out / "samples.json").write_text(json.dumps(records, indent=2))
    summary = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
    print(f"{args.num_envs} images, {args.reward}: mean {summary['reward_mean']:.4f} +- {summary['reward_std']:.4f}")
    print(f"saved {args.out / 'samples.png'} and {args.out / 'samples.json'}")
    env.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command: exit status 0 on success; a bad argument is one line on stderr and status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rollout(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        # Names, numbers and devices are checked where they are used; report them as argparse does.
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
