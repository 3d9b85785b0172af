"""Does a denoising step wait on the GPU? Steps the vector environment with CUDA's sync debug mode set to error.

    python benchmarks/sync_check.py --model /tmp/sd15-shaped --batch-size 4 --steps 10

A step that copies a GPU value to the host (``.item()``, ``bool(tensor)``, a CPU index of a CUDA
tensor) stalls the launch queue until the GPU catches up. With
``torch.cuda.set_sync_debug_mode("error")`` such a copy raises instead; every step but the last
runs in that mode (the last decodes the image and pays the reward, which is computed on the host).
It prints the steps that passed, or the first synchronising call with the frames of this project
that made it. On a CPU there is nothing to check: it says so.
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import torch

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import GaussianDenoisingPolicy
from diffusion_env.backends import DenoiserBackend, available_models
from shaped_pipelines import benchmark_denoiser

PROJECT = str(Path(__file__).resolve().parents[1])


def project_frames(error: BaseException) -> list[str]:
    """The frames of this project's code in ``error``'s traceback, innermost last."""
    frames = traceback.extract_tb(error.__traceback__)
    return [f"{frame.filename.removeprefix(PROJECT + '/')}:{frame.lineno} {frame.line}" for frame in frames if frame.filename.startswith(PROJECT)]


@torch.no_grad()
def check(backend: DenoiserBackend, batch_size: int, steps: int) -> tuple[int, BaseException | None]:
    """Steps one episode; returns how many steps ran in the error mode, and the first error (or None)."""
    env = gym.make_vec("DiffusionDenoise-v0", num_envs=batch_size, model=backend, num_inference_steps=steps, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env, seed=0)
    obs, _ = env.reset(seed=0)
    # A first step outside the mode: caches (the negative prompt's encoding) fill on first use.
    obs, *_ = env.step(policy.sample(obs))
    checked = 0
    cuda = backend.device.type == "cuda"
    for _ in range(steps - 2):
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            obs, *_ = env.step(policy.sample(obs))
        except RuntimeError as error:
            return checked, error
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        checked += 1
    env.step(policy.sample(obs))  # the last step: decoding and the reward, on the host
    env.close()
    return checked, None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sd", help=f"a registered model ({available_models()}), a hub id, a pipeline folder or shaped:NAME (shaped_pipelines.py)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (at least 3: the first and last are not checked)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error(f"--steps {args.steps}; allowed: 3 or more (the first and the last step are not checked)")
    try:
        backend = benchmark_denoiser(args.model, args.device)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    checked, error = check(backend, args.batch_size, args.steps)
    if torch.device(args.device).type != "cuda":
        print(f"device {args.device}: no CUDA, nothing to check ({checked} step(s) ran)")
    elif error is None:
        print(f"{torch.cuda.get_device_name()}: no host synchronisation in {checked} denoising steps of {args.model}")
    else:
        print(f"{torch.cuda.get_device_name()}: step {checked + 2} synchronised with the host: {error}")
        print("\n".join(f"  {line}" for line in project_frames(error)))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
