"""Training throughput of a DDPO-IS update: log-likelihoods recomputed batched across samples and
timesteps (``agents.ddpo_update``) against the reference implementations' structure.

The baseline, written here on the same model, samples and loss, follows DDPO's reference code:
for each minibatch of ``train_batch`` samples, loop over the timesteps, one network call of
``train_batch`` transitions per timestep, gradients accumulated over the timesteps, one optimiser
step per minibatch. It runs at DDPO's published per-device train batch (4) and at our batch size.
Figures: transitions (sample, timestep pairs) trained per second, median over repeats, and peak
memory. ``--model`` takes any registered model name, hub id or pipeline folder (default ``tiny-random``, the test-sized
model at its registered 16x16; ``shapes32`` is the built-in model); the trained parameters are
the back-end's ``trainable_module()``.

    python benchmarks/train_throughput.py --num-envs 32 --steps 20 --minibatch 64 [--model shapes32]

With ``--processes N`` it measures whole training epochs instead (``python -m agents.train``:
sampling, rewards, advantages, update): one process against N launched by ``accelerate launch``
on the same total batch (``--num-envs`` split over the processes), the median epoch time after
the first (warm-up) epoch, read from each run's history.

    python benchmarks/train_throughput.py --processes 2 --num-envs 8 --steps 10 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import torch

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import (
    DDPOConfig,
    GaussianDenoisingPolicy,
    Trajectories,
    collect_trajectories,
    ddpo_update,
)
from agents.advantages import batch_normalized_advantages
from agents.losses import clipped_surrogate_loss
from diffusion_env.samplers.base import per_dimension
from diffusion_env.backends import available_models
from shaped_pipelines import SHAPED, benchmark_denoiser


def timestep_loop_update(
    policy: GaussianDenoisingPolicy,
    samples: Trajectories,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    train_batch: int,
    clip_range: float,
) -> None:
    """DDPO's reference structure: per minibatch of samples, one network call per timestep."""
    for start in range(0, samples.batch_size, train_batch):
        indices = torch.arange(start, min(start + train_batch, samples.batch_size))
        optimizer.zero_grad(set_to_none=True)
        for step in range(samples.num_steps):
            steps = torch.full_like(indices, step)
            actions = samples.actions(indices, steps)
            log_probs = policy.log_prob(samples.observations(indices, steps), actions)
            log_ratio = per_dimension(log_probs - samples.log_probs[indices, steps], actions)
            loss, _ = clipped_surrogate_loss(log_ratio, advantages[indices], clip_range)
            (loss / samples.num_steps).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device``, or the process's peak resident memory on a CPU, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def epoch_seconds(processes: int, args: argparse.Namespace, folder: Path) -> float:
    """The median epoch time after the first of a training run of ``processes`` processes on ``args.num_envs`` samples."""
    config = folder / f"processes-{processes}.toml"
    config.write_text(
        f'[run]\ndevice = "{args.device}"\nepochs = {args.epochs}\n'
        f'[env]\nmodel = "{args.model}"\nnum_envs = {args.num_envs // processes}\nnum_inference_steps = {args.steps}\n'
        f'[algorithm]\nname = "ddpo-is"\nminibatch_size = {args.minibatch}\n'
    )
    output_dir = folder / f"run-{processes}"
    train = ["-m", "agents.train", "--config", str(config), "--output-dir", str(output_dir)]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        launcher = Path(sys.executable).with_name("accelerate")
        command = [str(launcher), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", *train]
    # The threads of the machine shared among the processes, as accelerate does on a CPU.
    threads = max(1, (os.cpu_count() or 1) // processes)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode != 0:
        raise SystemExit(f"the {processes}-process run failed:\n{result.stderr[-2000:]}")
    history = torch.load(output_dir / "checkpoint-{:04d}".format(args.epochs) / "state.pt", weights_only=True)["history"]
    return statistics.median(h["charts/epoch_seconds"] for h in history[1:])


def data_parallel_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Epoch time of 1 process against ``args.processes`` on the same total batch."""
    if args.processes < 2 or args.num_envs % args.processes or args.epochs < 2:
        parser.error(
            f"--processes {args.processes} --num-envs {args.num_envs} --epochs {args.epochs}; allowed: 2 or more "
            "processes that divide --num-envs, and 2 or more epochs (the first is a warm-up)"
        )
    if args.model.startswith(SHAPED):
        parser.error(f"--processes with --model {args.model}: each training process reads the model by name; "
                     "allowed: a registered model, a hub id or a pipeline folder (shaped_pipelines.py --out writes one)")
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device {args.device} ({card}), torch {torch.__version__}; {args.model}, DDPO-IS, "
          f"{args.num_envs} samples x {args.steps} steps per epoch, median of epochs 2-{args.epochs}")
    with tempfile.TemporaryDirectory() as folder:
        seconds = {n: epoch_seconds(n, args, Path(folder)) for n in (1, args.processes)}
    for n, value in seconds.items():
        print(f"{n} process(es), {args.num_envs // n:3d} samples each: {value:8.2f} s/epoch, "
              f"{args.num_envs / value:8.2f} samples/s")
    print(f"{args.processes} processes against 1: {seconds[1] / seconds[args.processes]:.2f}x")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-envs", type=int, default=32, help="samples per batch")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per sample")
    parser.add_argument("--minibatch", type=int, default=64, help="our (sample, timestep) pairs per network call")
    parser.add_argument("--model", default="tiny-random", help=f"a registered model ({available_models()}), a hub id, a pipeline folder or shaped:NAME (shaped_pipelines.py)")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: the whole network)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--processes", type=int, default=None, help="compare training epochs of 1 and this many processes")
    parser.add_argument("--epochs", type=int, default=3, help="with --processes: epochs per run (the first is a warm-up)")
    args = parser.parse_args(argv)
    if args.processes is not None:
        data_parallel_main(args, parser)
        return
    device = torch.device(args.device)

    try:
        backend = benchmark_denoiser(args.model, device)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error))
    env = gym.make_vec("DiffusionDenoise-v0", num_envs=args.num_envs, model=backend,
                       num_inference_steps=args.steps, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    samples = collect_trajectories(env, policy, generator=torch.Generator(device=device).manual_seed(0), seed=0)
    advantages = batch_normalized_advantages(samples.rewards)
    trainable = policy.add_lora(args.lora_rank).values() if args.lora_rank > 0 else policy.network.parameters()
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    transitions = samples.batch_size * samples.num_steps
    config = DDPOConfig(minibatch_size=args.minibatch)
    generator = torch.Generator().manual_seed(0)

    paths = {
        f"batched across samples and timesteps (minibatch {args.minibatch})":
            lambda: ddpo_update(policy, samples, advantages, optimizer, config, generator),
        "timestep loop, train batch 4 (DDPO's published per-device batch)":
            lambda: timestep_loop_update(policy, samples, advantages, optimizer, 4, config.clip_range),
        f"timestep loop, train batch {args.num_envs} (our batch)":
            lambda: timestep_loop_update(policy, samples, advantages, optimizer, args.num_envs, config.clip_range),
    }
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"device {device} ({card}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"network {sum(p.numel() for p in backend.trainable_module().parameters()) / 1e6:.2f} M parameters, "
          f"{args.model} {samples.latents.shape[-2]}x{samples.latents.shape[-1]}; "
          f"{args.num_envs} samples x {args.steps} steps")
    rates = {}
    for name, update in paths.items():
        update()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        rates[name] = transitions / statistics.median(times)
        kind = "peak GPU memory" if device.type == "cuda" else "peak RSS so far"
        print(f"{name:>62}: {rates[name]:8.1f} transitions/s  ({kind} {peak_memory_mb(device):.0f} MB)")
    ours, batch4, same = rates.values()
    print(f"speed-up over the timestep loop at batch 4: {ours / batch4:.2f}x; at batch {args.num_envs}: {ours / same:.2f}x")


if __name__ == "__main__":
    main()
