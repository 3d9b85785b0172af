"""Throughput and memory of the vector environment against a bare diffusers sampling loop.

Both paths run the same back-end (``--model``, any registered name, hub id or pipeline folder; default ``shapes32``, the
built-in model and the environment's default), batch size, number of steps, guidance scale and
the sampler of the back-end's scheduler (DDIM with eta = 1 for the registered models):

- env: ``gym.make_vec("DiffusionDenoise-v0", array_type="torch")`` stepped by
  ``GaussianDenoisingPolicy.sample_with_log_prob`` (the policy's mean, sigma and exact
  log-likelihood, action checks, state bookkeeping, decoding and the JPEG reward at the end);
- bare: the back-end's network call (``backend.predict``) then the diffusers scheduler's own
  ``step`` (``eta=1.0`` for DDIM; for a flow-matching model, SD3 or FLUX, the Euler step of
  ``FlowMatchEulerDiscreteScheduler`` on the pipeline's schedule, while the environment samples
  the flow SDE), nothing else: its prompts are encoded once, before the timing;
- pipeline: what a diffusers pipeline call does with new prompts: the bare loop after encoding
  the episode's prompts (drawn from the environment's prompt set, one per sample as the
  environment draws them), and the VAE decoding of its final latents.

The environment encodes new prompts every episode, so where the text encoders are as large as the
denoising network (the test-sized SD3 and FLUX pipelines: T5 on 256 or 512 tokens beside a transformer
of 0.1 M parameters) its ratio to the bare loop measures that encoding, and the ratio to the
pipeline path is the cost of the environment's own machinery.

Timed episodes of the three paths alternate, so that drift of the machine hits all alike; the
median episode time gives transitions per second (batch x steps / time). Then the environment
runs many short episodes and its resident memory is sampled, to show it stays flat.

    python benchmarks/env_throughput.py --batch-sizes 32 64 --episodes 5 [--model tiny-random | tiny-sd3 | tiny-flux]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import GaussianDenoisingPolicy
from diffusion_env.backends import DenoiserBackend, available_models
from diffusion_env.backends.base import backend_sampler_options
from diffusion_env.envs import DEFAULT_MODEL
from diffusion_env.prompts import PromptSet
from shaped_pipelines import benchmark_denoiser


def resident_memory_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_resident_memory_mb() -> float:
    """Peak resident set size of this process so far in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def peak_gpu_memory_mb(episode: Callable[[], None], device: torch.device) -> float:
    """Peak GPU memory allocated while one episode runs, in MB."""
    torch.cuda.reset_peak_memory_stats(device)
    episode()
    return torch.cuda.max_memory_allocated(device) / 1e6


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def env_episode(env: gym.vector.VectorEnv, policy: GaussianDenoisingPolicy, generator: torch.Generator) -> None:
    obs, _ = env.reset()
    terminated = torch.zeros(1, dtype=torch.bool)
    while not bool(terminated.all()):
        action, _ = policy.sample_with_log_prob(obs, generator=generator)
        obs, _, terminated, _, _ = env.step(action)


def bare_episode(
    backend: DenoiserBackend,
    scheduler: SchedulerMixin,
    conditioning: Mapping[str, torch.Tensor],
    guidance_scale: float,
    batch: int,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One sampling loop: the back-end's network call, then the diffusers scheduler's ``step``;
    returns the final latents."""
    # Set per episode: a flow-matching scheduler counts its steps; the schedule is the pipeline's
    # (FLUX's sigmas and shift, which the back-end names).
    scheduler.set_timesteps(steps, **backend_sampler_options(backend, steps))
    # A flow-matching scheduler has no init_noise_sigma: its x_1 is standard normal.
    latents = torch.randn(
        (batch, *backend.latent_shape), generator=generator, device=backend.device, dtype=backend.dtype
    ) * getattr(scheduler, "init_noise_sigma", 1.0)
    step_options = {"eta": 1.0} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        output = backend.predict(latents, t.to(backend.device).expand(batch), conditioning, guidance_scale)
        latents = scheduler.step(output, t, latents, generator=generator, **step_options).prev_sample
    return latents


def pipeline_episode(
    backend: DenoiserBackend,
    scheduler: SchedulerMixin,
    prompt_set: PromptSet,
    guidance_scale: float,
    batch: int,
    steps: int,
    generator: torch.Generator,
    rng: np.random.Generator,
) -> None:
    """A pipeline call's work: encode the episode's prompts, the bare loop, decode its latents."""
    prompts, _ = prompt_set.sample(batch, rng)
    conditioning = backend.encode_prompts(prompts)
    latents = bare_episode(backend, scheduler, conditioning, guidance_scale, batch, steps, generator)
    backend.decode(latents)


def timed(episode: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    episode()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def compare(backend: DenoiserBackend, batch: int, steps: int, episodes: int) -> dict[str, float | str]:
    """Median transitions/s of the environment, the bare loop and the pipeline path, the
    environment's ratios to both, and the memory figure."""
    device = backend.device
    env = gym.make_vec(
        "DiffusionDenoise-v0", num_envs=batch, model=backend, num_inference_steps=steps, array_type="torch"
    )
    env.reset(seed=0)
    policy = GaussianDenoisingPolicy.from_env(env)
    scheduler = type(backend.scheduler).from_config(backend.scheduler.config)
    conditioning = backend.encode_prompts(env.unwrapped.prompts)
    guidance_scale = env.unwrapped.guidance_scale
    prompt_set = env.unwrapped.prompt_set
    generator = torch.Generator(device=device).manual_seed(0)
    rng = np.random.default_rng(0)

    paths = {
        "env": lambda: env_episode(env, policy, generator),
        "bare": lambda: bare_episode(backend, scheduler, conditioning, guidance_scale, batch, steps, generator),
        "pipeline": lambda: pipeline_episode(backend, scheduler, prompt_set, guidance_scale, batch, steps, generator, rng),
    }
    for episode in paths.values():  # warm-up: allocator, kernels, the negative prompt's cache
        episode()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(episodes):  # the paths alternate, so that drift of the machine hits all alike
        for name, episode in paths.items():
            times[name].append(timed(episode, device))
    rates = {name: batch * steps / statistics.median(values) for name, values in times.items()}
    if device.type == "cuda":
        peaks = {name: peak_gpu_memory_mb(episode, device) for name, episode in paths.items()}
        memory = "peak GPU memory " + ", ".join(f"{name} {peak:.0f} MB" for name, peak in peaks.items())
    else:
        memory = f"peak RSS so far {peak_resident_memory_mb():.0f} MB"
    env.close()
    return {**rates, "ratio": rates["env"] / rates["bare"], "pipeline_ratio": rates["env"] / rates["pipeline"], "memory": memory}


@torch.no_grad()
def memory_over_episodes(backend: DenoiserBackend, episodes: int, batch: int, steps: int) -> list[tuple[int, float]]:
    env = gym.make_vec("DiffusionDenoise-v0", num_envs=batch, model=backend, num_inference_steps=steps, array_type="torch")
    env.reset(seed=0)
    policy = GaussianDenoisingPolicy.from_env(env)
    generator = torch.Generator(device=backend.device).manual_seed(0)
    samples = []
    for episode in range(1, episodes + 1):
        env_episode(env, policy, generator)
        if episode in (1, 10) or episode % max(1, episodes // 5) == 0:
            memory = (
                torch.cuda.memory_allocated(backend.device) / 1e6
                if backend.device.type == "cuda"
                else resident_memory_mb()
            )
            samples.append((episode, memory))
    env.close()
    return samples


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a registered model ({available_models()}), a hub id, a pipeline folder or shaped:NAME (shaped_pipelines.py)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per episode")
    parser.add_argument("--episodes", type=int, default=5, help="timed episodes per path and batch size")
    parser.add_argument(
        "--memory-episodes", type=int, default=1000, help="episodes of the memory check (at least 10: growth is from episode 10)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.memory_episodes < 10:
        parser.error(f"--memory-episodes {args.memory_episodes}; allowed: 10 or more (growth is measured from episode 10)")

    try:
        backend = benchmark_denoiser(args.model, args.device)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    parameters = sum(p.numel() for p in backend.trainable_module().parameters())
    card = torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    height, width = backend.latent_shape[1:]
    print(f"device {args.device} ({card}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model {args.model}: network {parameters / 1e6:.2f} M parameters, latents {height}x{width}, "
          f"{args.steps} steps of {type(backend.scheduler).__name__}")
    print(f"{'batch':>5} {'transitions/s: env':>19} {'bare':>8} {'pipeline':>9} {'env / bare':>11} {'env / pipeline':>15}")
    for batch in args.batch_sizes:
        result = compare(backend, batch, args.steps, args.episodes)
        print(f"{batch:>5} {result['env']:>19.1f} {result['bare']:>8.1f} {result['pipeline']:>9.1f} "
              f"{result['ratio']:>11.3f} {result['pipeline_ratio']:>15.3f}  {result['memory']}")

    print(f"memory over {args.memory_episodes} episodes (batch 4, 2 steps each):")
    samples = memory_over_episodes(backend, args.memory_episodes, batch=4, steps=2)
    kind = "GPU allocated" if backend.device.type == "cuda" else "RSS"
    for episode, memory in samples:
        print(f"  after episode {episode:>5}: {kind} {memory:8.1f} MB")
    at_episode_10 = dict(samples)[10]
    print(f"  growth from episode 10 to {samples[-1][0]}: {samples[-1][1] - at_episode_10:+.1f} MB")


if __name__ == "__main__":
    main()
