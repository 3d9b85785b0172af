"""Fine-tune a diffusion model on a reward through the DiffusionDenoise environment.

    python -m agents.train --config agents/configs/compressibility.toml --output-dir runs/compress
    python -m agents.train --config ... --output-dir runs/compress --resume
    python -m agents.train --algorithm ddpo-sf --reward jpeg_incompressibility --epochs 5 ...

Each epoch collects ``batches_per_epoch`` batches of ``num_envs`` trajectories with the current
policy, turns rewards into advantages (per-prompt statistics by default), and trains with
DDPO-IS, DDPO-SF or RWR. It logs to TensorBoard (``charts/...``, ``losses/...``, and with
``--monitor`` a second reward scored on the same images but not trained on), saves a grid of
the epoch's samples with their prompts and rewards, checkpoints atomically (a killed run never
leaves a broken checkpoint), resumes exactly with ``--resume``, and plots the reward curve.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.advantages import PerPromptStatTracker, batch_normalized_advantages, clip_advantages
from agents.ddpo import DDPOConfig, NonFiniteError, ddpo_update
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories, collect_trajectories
from agents.rwr import RWRConfig, rwr_update
from diffusion_env.rewards import make_reward

ALGORITHMS = ("ddpo-is", "ddpo-sf", "rwr")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved beside its checkpoints. Field docs double as ``--help``."""

    algorithm: str = field(default="ddpo-is", metadata={"help": f"one of {ALGORITHMS}"})
    reward: str = field(default="jpeg_compressibility", metadata={"help": "registered reward name"})
    prompts: str = field(default="scenes_train", metadata={"help": "registered prompt-set name"})
    model: str | None = field(default=None, metadata={"help": "registered model name (default: the env's)"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    num_envs: int = field(default=16, metadata={"help": "trajectories sampled per batch"})
    batches_per_epoch: int = field(default=4, metadata={"help": "batches sampled per epoch"})
    samples_per_prompt: int = field(default=1, metadata={"help": "samples of each prompt in a batch (divides num_envs)"})
    num_inference_steps: int = field(default=20, metadata={"help": "denoising steps per trajectory"})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta in (0, 1]"})
    guidance_scale: float | None = field(default=None, metadata={"help": "classifier-free guidance (default: model's)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank through peft; 0 fine-tunes the whole UNet"})
    per_prompt_advantages: bool = field(default=True, metadata={"help": "per-prompt reward statistics (else batch)"})
    tracker_buffer_size: int = field(default=32, metadata={"help": "rewards kept per prompt"})
    tracker_min_count: int = field(default=16, metadata={"help": "below this, batch statistics are used"})
    advantage_clip: float = field(default=5.0, metadata={"help": "advantages are clipped to +-this"})
    clip_range: float = field(default=1e-4, metadata={"help": "DDPO-IS clip range"})
    per_dimension_ratio: bool = field(default=True, metadata={"help": "clip the per-dimension ratio (DDPO's code)"})
    inner_epochs: int = field(default=1, metadata={"help": "DDPO-IS and RWR passes over each epoch's samples"})
    minibatch_size: int = field(default=32, metadata={"help": "(sample, timestep) pairs per network call"})
    gradient_accumulation: int = field(default=1, metadata={"help": "minibatches per optimiser step"})
    timestep_fraction: float = field(default=1.0, metadata={"help": "fraction of timesteps trained on"})
    min_sigma: float = field(default=0.0, metadata={"help": "DDPO: steps with sigma_t below this are not trained on"})
    max_sigma: float = field(default=math.inf, metadata={"help": "DDPO: steps with sigma_t above this are not trained on"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    kl_coefficient: float = field(default=0.0, metadata={"help": "weight of the KL to the pretrained model"})
    rwr_weighting: str = field(default="exponential", metadata={"help": "RWR weights: exponential or sparse"})
    rwr_beta: float = field(default=1.0, metadata={"help": "RWR inverse temperature (of the advantages)"})
    rwr_percentile: float = field(default=90.0, metadata={"help": "sparse RWR threshold percentile (of the advantages)"})
    monitor: str | None = field(
        default=None,
        metadata={"help": "reward scored on each epoch's images for logging only (charts/monitor/...), e.g. scene_alignment"},
    )
    seed: int = field(default=0, metadata={"help": "seed of prompts, noise and minibatch order"})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "torch device"})
    checkpoint_every: int = field(default=1, metadata={"help": "epochs between checkpoints"})

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}; allowed: {ALGORITHMS}")
        for name in ("epochs", "num_envs", "batches_per_epoch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: an int >= 1")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank}; allowed: >= 0 (0 = full fine-tuning)")

    def ddpo(self) -> DDPOConfig:
        return DDPOConfig(
            estimator="sf" if self.algorithm == "ddpo-sf" else "is",
            clip_range=self.clip_range,
            per_dimension_ratio=self.per_dimension_ratio,
            inner_epochs=self.inner_epochs,
            minibatch_size=self.minibatch_size,
            gradient_accumulation=self.gradient_accumulation,
            timestep_fraction=self.timestep_fraction,
            min_sigma=self.min_sigma,
            max_sigma=self.max_sigma,
            max_grad_norm=self.max_grad_norm,
            kl_coefficient=self.kl_coefficient,
        )

    def rwr(self) -> RWRConfig:
        return RWRConfig(
            weighting=self.rwr_weighting,
            beta=self.rwr_beta,
            percentile=self.rwr_percentile,
            minibatch_size=self.minibatch_size,
            epochs=self.inner_epochs,
            max_grad_norm=self.max_grad_norm,
        )


# ---------------------------------------------------------------------------- set-up


class Run:
    """The state of a training run: environment, policy, optimiser, RNGs, history."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        model_kwargs = {} if config.model is None else {"model": config.model}
        self.env = gym.make_vec(
            "DiffusionDenoise-v0",
            num_envs=config.num_envs,
            reward=config.reward,
            prompts=config.prompts,
            num_inference_steps=config.num_inference_steps,
            eta=config.eta,
            guidance_scale=config.guidance_scale,
            device=config.device,
            array_type="torch",
            samples_per_prompt=config.samples_per_prompt,
            **model_kwargs,
        )
        self.env.reset(seed=config.seed)
        self.policy = GaussianDenoisingPolicy.from_env(self.env)
        self.reference_policy = copy.deepcopy(self.policy).requires_grad_(False) if config.kl_coefficient > 0 else None
        if config.lora_rank > 0:
            self.trainable = self.policy.add_lora(config.lora_rank)
        else:
            self.trainable = dict(self.policy.backend.trainable_module().named_parameters())
        self.optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.learning_rate)
        self.monitor = None if config.monitor is None else make_reward(config.monitor)
        self.tracker = PerPromptStatTracker(config.tracker_buffer_size, config.tracker_min_count)
        self.sample_generator = torch.Generator(device=config.device).manual_seed(config.seed)
        self.update_generator = torch.Generator().manual_seed(config.seed + 1)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: Path) -> None:
        """Writes the run to ``directory/checkpoint-EEEE`` atomically, then points ``latest`` at it.

        Everything is written into a temporary folder first and renamed into place; ``latest`` is
        replaced with ``os.replace``. A run killed at any moment leaves the previous checkpoint
        and its pointer intact.
        """
        final = directory / f"checkpoint-{self.epoch:04d}"
        partial = directory / f".partial-{final.name}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({name: p.detach().cpu().contiguous() for name, p in self.trainable.items()}, partial / "trainable.safetensors")
        torch.save(
            {
                "epoch": self.epoch,
                "optimizer": self.optimizer.state_dict(),
                "tracker": self.tracker.state_dict(),
                "sample_generator": self.sample_generator.get_state(),
                "update_generator": self.update_generator.get_state(),
                "env_rng": self.env.unwrapped.np_random.bit_generator.state,
                "history": self.history,
            },
            partial / "state.pt",
        )
        (partial / "config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        pointer = directory / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, directory / "latest")

    def load(self, directory: Path, epoch: int | None = None) -> None:
        """Restores the run from the checkpoint ``directory/latest`` names, or from that of ``epoch``."""
        name = (directory / "latest").read_text().strip() if epoch is None else f"checkpoint-{epoch:04d}"
        checkpoint = directory / name
        if not (checkpoint / "state.pt").exists():
            raise FileNotFoundError(f"no checkpoint {checkpoint} (checkpoints are saved every checkpoint_every epochs)")
        weights = load_file(checkpoint / "trainable.safetensors")
        if set(weights) != set(self.trainable):
            raise ValueError(
                f"checkpoint {checkpoint} holds other parameters than this run trains "
                f"(was it made with another lora_rank or model?)"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                self.trainable[name].copy_(tensor)
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.sample_generator.set_state(state["sample_generator"])
        self.update_generator.set_state(state["update_generator"])
        self.env.unwrapped.np_random.bit_generator.state = state["env_rng"]
        self.epoch = state["epoch"]
        self.history = state["history"]

    # ------------------------------------------------------------------ one epoch

    def collect(self) -> Trajectories:
        return Trajectories.concatenate(
            [
                collect_trajectories(self.env, self.policy, generator=self.sample_generator)
                for _ in range(self.config.batches_per_epoch)
            ]
        )

    def advantages(self, samples: Trajectories) -> torch.Tensor:
        """The batch's clipped advantages: per-prompt statistics (updating the tracker) or batch ones."""
        if self.config.per_prompt_advantages:
            advantages = self.tracker.update(samples.prompts, samples.rewards)
        else:
            advantages = batch_normalized_advantages(samples.rewards)
        return clip_advantages(advantages, self.config.advantage_clip)

    def train_epoch(self) -> tuple[dict[str, float], Trajectories]:
        config = self.config
        samples = self.collect()
        advantages = self.advantages(samples)
        if config.algorithm == "rwr":
            figures = rwr_update(self.policy, samples, self.optimizer, config.rwr(), self.update_generator, advantages)
        else:
            figures = ddpo_update(
                self.policy, samples, advantages, self.optimizer, config.ddpo(), self.update_generator, self.reference_policy
            )
        for name, parameter in self.trainable.items():
            if not bool(torch.isfinite(parameter).all()):
                raise NonFiniteError(f"parameter {name} is not finite after epoch {self.epoch + 1}; stopping")
        rewards = samples.rewards.float()
        figures.update(
            {
                "charts/reward_mean": float(rewards.mean()),
                "charts/reward_std": float(rewards.std()),
                "charts/reward_queries": float((self.epoch + 1) * samples.batch_size),
            }
        )
        if self.monitor is not None:
            figures.update(self.monitor_figures(samples))
        self.epoch += 1
        return figures, samples

    def monitor_figures(self, samples: Trajectories) -> dict[str, float]:
        """The monitoring reward's mean on the epoch's images, and the mean of each of its details
        over the samples where it is defined (``RewardResult.detail_means``)."""
        result = self.monitor(samples.images, samples.prompts, samples.metadata)
        figures = {f"charts/monitor/{self.monitor.name}": float(result.rewards.float().mean())}
        figures.update({f"charts/monitor/{key}": mean for key, mean in result.detail_means().items()})
        return figures


# ---------------------------------------------------------------------------- outputs


def save_sample_grid(samples: Trajectories, decode: Any, path: Path, count: int = 16) -> None:
    """A grid of the first ``count`` final images with their prompts and rewards (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, samples.batch_size)
    images = decode(samples.latents[:count, -1]).cpu().numpy()
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for i in range(count):
        axis = axes.flat[i]
        axis.imshow(images[i], interpolation="nearest")
        axis.set_title(f"{samples.prompts[i]}\nreward {float(samples.rewards[i]):.3f}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_reward_curve(history: list[dict[str, float]], path: Path) -> None:
    """Mean reward (with one standard deviation) per epoch; beside it the monitored figures, if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history) + 1)
    mean = np.array([h["charts/reward_mean"] for h in history])
    std = np.array([h["charts/reward_std"] for h in history])
    monitored = sorted({key for h in history for key in h if key.startswith("charts/monitor/")})
    figure, axes = plt.subplots(1, 2 if monitored else 1, figsize=(11 if monitored else 6, 4), squeeze=False)
    axis = axes[0, 0]
    axis.plot(epochs, mean, marker="o")
    axis.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("epoch")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    if monitored:
        axis = axes[0, 1]
        for key in monitored:
            values = [h.get(key, np.nan) for h in history]
            axis.plot(epochs, values, marker=".", label=key.removeprefix("charts/monitor/"))
        axis.set_xlabel("epoch")
        axis.set_ylabel("monitored (not trained on)")
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def train(config: TrainConfig, output_dir: Path, resume: bool = False) -> list[dict[str, float]]:
    """Runs (or resumes) training; returns the per-epoch figures."""
    from torch.utils.tensorboard import SummaryWriter

    output_dir.mkdir(parents=True, exist_ok=True)
    run = Run(config)
    if resume:
        if not (output_dir / "latest").exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {output_dir} (no 'latest' file)")
        run.load(output_dir)
    writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=run.epoch + 1)
    with tqdm(total=config.epochs, initial=run.epoch, desc=config.algorithm) as progress:
        while run.epoch < config.epochs:
            started = time.perf_counter()
            figures, samples = run.train_epoch()
            figures["charts/epoch_seconds"] = time.perf_counter() - started
            run.history.append(figures)
            for key, value in figures.items():
                writer.add_scalar(key, value, run.epoch)
            save_sample_grid(samples, run.policy.backend.decode, output_dir / f"samples-{run.epoch:04d}.png")
            if run.epoch % config.checkpoint_every == 0 or run.epoch == config.epochs:
                run.save(output_dir)
            progress.set_postfix(reward=f"{figures['charts/reward_mean']:.4f}")
            progress.update()
    writer.close()
    save_reward_curve(run.history, output_dir / "reward_curve.png")
    run.env.close()
    return run.history


def read_config_file(path: Path) -> dict[str, Any]:
    """The TrainConfig fields a TOML file sets; a key that is no field is refused by name."""
    values: dict[str, Any] = tomllib.loads(path.read_text())
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise SystemExit(f"unknown keys in {path}: {sorted(unknown)}")
    return values


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="TOML file of TrainConfig fields; flags override it")
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints, logs and images")
    parser.add_argument("--resume", action="store_true", help="continue from the output dir's latest checkpoint")
    for config_field in dataclasses.fields(TrainConfig):
        flag = "--" + config_field.name.replace("_", "-")
        kind = config_field.type
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=config_field.metadata["help"])
        else:
            convert = {"int": int, "float": float}.get(kind.split(" |")[0], str)
            parser.add_argument(flag, type=convert, default=None, help=config_field.metadata["help"])
    args = parser.parse_args(argv)
    values = read_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "output_dir", "resume") and v is not None})
    return TrainConfig(**values), args.output_dir, args.resume


def main(argv: list[str] | None = None) -> None:
    config, output_dir, resume = parse_args(argv)
    history = train(config, output_dir, resume)
    print(json.dumps(history[-1], indent=2))


if __name__ == "__main__":
    main()
