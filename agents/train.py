"""Fine-tune a diffusion model on a reward through the DiffusionDenoise environment.

    python -m agents.train --config agents/configs/compressibility.toml --output-dir runs/compress
    python -m agents.train --output-dir runs/compress --resume
    python -m agents.train --algorithm ddpo-sf --reward jpeg_incompressibility --epochs 5 --output-dir runs/sf

Each epoch collects ``batches_per_epoch`` batches of ``num_envs`` trajectories with the current
policy, turns rewards into advantages (per-prompt statistics by default, or the algorithm's own:
GRPO's group statistics) and trains with a registered algorithm (:mod:`agents.algorithms`:
DDPO-IS, DDPO-SF, RWR, GRPO). It logs to TensorBoard
(``charts/...``, ``losses/...``, and with ``--monitor`` a second reward scored on the same images
but not trained on), saves a grid of the epoch's samples with their prompts and rewards,
checkpoints atomically (:mod:`diffusion_env.checkpoints`), and plots the reward curve.

Launched by ``accelerate launch`` (``--multi_gpu --num_processes N``, or an accelerate config
file), it trains data-parallel over N processes (:mod:`agents.distributed`).

``--resume`` continues the run in ``--output-dir`` exactly: its saved config is the default, and
a setting given on the command line that differs from the saved one is refused, except
``epochs``, ``checkpoint_every`` and ``keep_checkpoints``. A folder that holds a run is not
written into without ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.advantages import PerPromptStatTracker, batch_normalized_advantages, clip_advantages
from agents.algorithms import NonFiniteError, UpdateContext, get_algorithm, make_reference
from agents.config import (
    ConfigError,
    TrainConfig,
    add_flags,
    merge_tables,
    read_config_file,
    tables_from_flags,
)
from agents.distributed import Processes, launched_processes
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Outcomes, Trajectories, collect_trajectories
from diffusion_env import checkpoints
from diffusion_env.prompts import PromptSet
from diffusion_env.rewards import RewardError, make_reward
from diffusion_env.validation import check_device

#: Settings a resumed run may change: they do not change what an epoch computes.
RESUMABLE_CHANGES: tuple[tuple[str, str], ...] = (("run", "epochs"), ("run", "checkpoint_every"), ("run", "keep_checkpoints"))
#: The checkpoint folders' name prefix (``checkpoint-0012`` holds the run after epoch 12).
CHECKPOINT_PREFIX = "checkpoint-"
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------- set-up


class Run:
    """The state of a training run: environment, policy, optimiser, reference policy, RNGs, history.

    Args:
        config: the run's settings.
        reference: build the reference policy of a KL penalty when the algorithm's config asks
            for one (False when only sampling from the policy: saves a copy of a fully
            fine-tuned model).
        processes: the run's processes (:mod:`agents.distributed`); default: those a launcher
            started (``accelerate launch``, ``torchrun``), else this one alone.
    """

    def __init__(self, config: TrainConfig, *, reference: bool = True, processes: Processes | None = None) -> None:
        self.config = config
        device = str(check_device(config.run.device))
        self.processes = processes or launched_processes(device)
        device = self.processes.device(device)
        if torch.device(device).type == "cuda":
            # TF32 tensor cores for float32 matmuls and convolutions: ~10 bits of mantissa, as the
            # half-precision frozen parts already have.
            torch.backends.cuda.matmul.allow_tf32 = config.run.tf32
            torch.backends.cudnn.allow_tf32 = config.run.tf32
        seed = self.processes.seed(config.run.seed)
        self.algorithm = get_algorithm(config.algorithm.name)
        env_config = config.env
        prompts = env_config.prompts if env_config.prompt_file is None else PromptSet.from_file(env_config.prompt_file)
        model_kwargs = {} if env_config.model is None else {"model": env_config.model}
        self.env = gym.make_vec(
            "DiffusionDenoise-v0",
            num_envs=env_config.num_envs,
            reward=config.reward.name,
            prompts=prompts,
            num_inference_steps=env_config.num_inference_steps,
            eta=env_config.eta,
            sampler=env_config.sampler,
            sampler_options=env_config.sampler_options,
            guidance_scale=env_config.guidance_scale,
            device=device,
            array_type="torch",
            samples_per_prompt=env_config.samples_per_prompt,
            height=env_config.height,
            width=env_config.width,
            negative_prompt=env_config.negative_prompt,
            **model_kwargs,
        )
        self.env.reset(seed=seed)
        self.policy = GaussianDenoisingPolicy.from_env(self.env)
        if config.optimizer.lora_rank > 0:
            self.trainable = self.policy.add_lora(config.optimizer.lora_rank, seed=config.run.seed)
        else:
            self.trainable = dict(self.policy.network.named_parameters())
        if config.run.compile is not None:
            # In place (nn.Module.compile), after the adapters exist: sampling and training both
            # run the compiled network, and the reference below shares or copies it.
            self.policy.network.compile(backend=config.run.compile)
        # With LoRA the reference is the same network with its adapters off; else a frozen copy.
        needs_reference = reference and self.algorithm.uses_reference(config.algorithm.config)
        self.reference = make_reference(self.policy) if needs_reference else None
        optimizer = torch.optim.AdamW(self.trainable.values(), lr=config.optimizer.learning_rate)
        network, self.optimizer = self.processes.prepare(self.policy.network, optimizer)
        # Sampling runs the network as it is; training runs it through the module the processes
        # wrapped (with several processes: the one that averages gradients across them).
        self.trained_policy = self.policy if network is self.policy.network else self.policy.over_network(network)
        self.monitor = None if config.reward.monitor is None else make_reward(config.reward.monitor)
        self.tracker = PerPromptStatTracker(config.advantages.tracker_buffer_size, config.advantages.tracker_min_count)
        self.sample_generator = torch.Generator(device=device).manual_seed(seed)
        self.update_generator = torch.Generator().manual_seed(seed + 1)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.warned_no_signal = False

    # ------------------------------------------------------------------ checkpoints

    def random_states(self) -> dict[str, Any]:
        """This process's random states: of its sampling noise, its updates and its environment."""
        return {
            "sample_generator": self.sample_generator.get_state(),
            "update_generator": self.update_generator.get_state(),
            "env_rng": self.env.unwrapped.np_random.bit_generator.state,
        }

    def save(self, directory: Path) -> Path:
        """Writes the run to ``directory/checkpoint-EEEE`` atomically and points ``latest`` at it.

        Every process calls it: the random states of all are gathered, and rank 0 writes them with
        the trained weights and the optimiser (the same on every rank) while the others wait.
        """
        name = f"{CHECKPOINT_PREFIX}{self.epoch:04d}"
        random_states = self.processes.gather_objects([self.random_states()])
        if self.processes.is_main:
            checkpoints.write_checkpoint(
                directory,
                name,
                weights={"trainable": self.trainable},
                state={
                    "epoch": self.epoch,
                    "optimizer": self.optimizer.state_dict(),
                    "tracker": self.tracker.state_dict(),
                    "random_states": random_states,
                    "history": self.history,
                },
                texts={CONFIG_FILE: json.dumps(self.config.to_tables(), indent=2)},
                keep_last=self.config.run.keep_checkpoints,
            )
        self.processes.wait()
        return Path(directory) / name

    def load(self, directory: Path, epoch: int | None = None) -> None:
        """Restores the run from the checkpoint ``directory/latest`` names, or from that of ``epoch``."""
        checkpoint = find_run_checkpoint(directory, epoch)
        state = checkpoints.read_state(checkpoint)
        random_states = state["random_states"]
        if len(random_states) != self.processes.world_size:
            raise ValueError(
                f"checkpoint {checkpoint} was written by a run of {len(random_states)} process(es) and this run has "
                f"{self.processes.world_size}; allowed: resume with the same number of processes "
                f"(accelerate launch --num_processes {len(random_states)})"
            )
        weights = checkpoints.read_weights(checkpoint, "trainable")
        if set(weights) != set(self.trainable):
            raise ValueError(
                f"checkpoint {checkpoint} holds other parameters than this run trains "
                f"(was it made with another lora_rank or model?)"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                self.trainable[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        own = random_states[self.processes.rank]
        self.sample_generator.set_state(own["sample_generator"])
        self.update_generator.set_state(own["update_generator"])
        self.env.unwrapped.np_random.bit_generator.state = own["env_rng"]
        self.epoch = state["epoch"]
        self.history = state["history"]

    # ------------------------------------------------------------------ one epoch

    def collect(self) -> Trajectories:
        return Trajectories.concatenate(
            [
                collect_trajectories(
                    self.env,
                    self.policy,
                    generator=self.sample_generator,
                    shared_noise=self.config.env.shared_noise,
                    branch_step=self.config.env.branch_step,
                )
                for _ in range(self.config.env.batches_per_epoch)
            ]
        )

    def advantages(self, samples: Outcomes) -> torch.Tensor:
        """The batch's clipped advantages: the algorithm's own if it has them (GRPO's group statistics),
        else per-prompt statistics (updating the tracker) or batch ones. ``samples`` are the
        outcomes of all processes (every process computes the same advantages)."""
        if self.algorithm.advantages is not None:
            advantages = self.algorithm.advantages(samples, self.config.algorithm.config)
        elif self.config.advantages.per_prompt:
            advantages = self.tracker.update(samples.prompts, samples.rewards)
        else:
            advantages = batch_normalized_advantages(samples.rewards)
        return clip_advantages(advantages, self.config.advantages.clip)

    def train_epoch(self) -> tuple[dict[str, float], Trajectories]:
        """Collects an epoch's samples, computes their advantages and trains; returns the figures and samples."""
        samples = self.collect()
        outcomes, advantages = self.shared_advantages(samples)
        return self.update(samples, outcomes, advantages), samples

    def shared_advantages(self, samples: Trajectories) -> tuple[Outcomes, torch.Tensor]:
        """The outcomes of all processes' samples, and the advantages of this process's ``samples``
        (computed from all of them: :meth:`advantages`)."""
        outcomes = self.processes.gather_outcomes(samples.outcomes())
        return outcomes, self.processes.own_share(self.advantages(outcomes))

    def update(self, samples: Trajectories, outcomes: Outcomes, advantages: torch.Tensor) -> dict[str, float]:
        """Trains on this process's ``samples`` with their ``advantages``; returns the epoch's figures
        (``outcomes``: those of all processes, for the reward figures) and counts the epoch."""
        context = UpdateContext(
            config=self.config.algorithm.config,
            policy=self.trained_policy,
            optimizer=self.optimizer,
            generator=self.update_generator,
            max_grad_norm=self.config.optimizer.max_grad_norm,
            reference=self.reference,
            epoch=self.epoch,
            processes=self.processes,
        )
        figures = self.algorithm.update(context, samples, advantages)
        for name, parameter in self.trainable.items():
            if not bool(torch.isfinite(parameter).all()):
                raise NonFiniteError(f"parameter {name} is not finite after epoch {self.epoch + 1}; stopping")
        self.warn_without_signal(advantages, figures)
        if self.monitor is not None:
            figures.update(self.monitor_figures(samples))
        figures = self.processes.mean_figures(figures)
        rewards = outcomes.rewards.float()
        figures.update(
            {
                "charts/reward_mean": float(rewards.mean()),
                "charts/reward_std": float(rewards.std()),
                "charts/reward_queries": float((self.epoch + 1) * outcomes.batch_size),
            }
        )
        self.epoch += 1
        return figures

    def warn_without_signal(self, advantages: torch.Tensor, figures: dict[str, float]) -> None:
        """Warns (once per run) when an epoch's update had no reward signal or a zero gradient."""
        zero_gradient = figures.get("losses/grad_norm") == 0.0
        if self.warned_no_signal or (bool(advantages.any()) and not zero_gradient):
            return
        self.warned_no_signal = True
        cause = "every advantage is 0" if not bool(advantages.any()) else "the gradient norm is 0"
        if self.algorithm.advantages is not None:
            remedy = (
                f"the {self.algorithm.name} advantages compare the samples of each prompt, and a group whose rewards are "
                "all equal gives 0; allowed remedies: more samples_per_prompt, or a reward that tells the samples apart"
            )
        else:
            remedy = (
                "with per-prompt advantages a prompt is normalised by its own rewards once it has tracker_min_count of "
                "them, and rewards that are all equal give 0; allowed remedies: more samples_per_prompt, a larger "
                "tracker_min_count, or per_prompt = false in [advantages]"
            )
        warnings.warn(f"epoch {self.epoch + 1}: the update had no learning signal ({cause}); {remedy}", stacklevel=2)

    def monitor_figures(self, samples: Trajectories) -> dict[str, float]:
        """The monitoring reward's mean on the epoch's images, and the mean of each of its details
        over the samples where it is defined (``RewardResult.detail_means``)."""
        result = self.monitor(samples.images, samples.prompts, samples.metadata)
        figures = {f"charts/monitor/{self.monitor.name}": float(result.rewards.float().mean())}
        figures.update({f"charts/monitor/{key}": mean for key, mean in result.detail_means().items()})
        return figures


def find_run_checkpoint(directory: Path, epoch: int | None = None) -> Path:
    """The checkpoint of a run's folder: the latest, or that of ``epoch``.

    Raises:
        FileNotFoundError: if there is none (the message says how often checkpoints are saved).
    """
    name = None if epoch is None else f"{CHECKPOINT_PREFIX}{epoch:04d}"
    try:
        checkpoint = checkpoints.find_checkpoint(directory, name)
        if not (checkpoint / checkpoints.STATE_FILE).is_file():
            raise FileNotFoundError(f"no checkpoint {checkpoint} (it holds no {checkpoints.STATE_FILE})")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; checkpoints are saved every checkpoint_every epochs") from None
    return checkpoint


def saved_config(directory: Path, epoch: int | None = None) -> TrainConfig:
    """The config a run's checkpoint recorded."""
    checkpoint = find_run_checkpoint(directory, epoch)
    tables = json.loads((checkpoint / CONFIG_FILE).read_text())
    return TrainConfig.from_tables(tables, source=str(checkpoint / CONFIG_FILE))


def resume_differences(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """``[table] key: saved X, given Y`` for each setting that differs, except :data:`RESUMABLE_CHANGES`."""
    before, after = saved.to_tables(), given.to_tables()
    differences = []
    for table in after:
        for key in sorted(set(before.get(table, {})) | set(after[table])):
            old, new = before.get(table, {}).get(key), after[table].get(key)
            if old != new and (table, key) not in RESUMABLE_CHANGES:
                differences.append(f"[{table}] {key}: saved {old!r}, given {new!r}")
    return differences


# ---------------------------------------------------------------------------- outputs


def save_sample_grid(samples: Trajectories, decode: Any, path: Path, count: int = 16) -> None:
    """A grid of the first ``count`` final images with their prompts and rewards (matplotlib)."""
    # A Figure of its own, not pyplot's: the process's plotting backend (a notebook's) is untouched.
    from matplotlib.figure import Figure

    count = min(count, samples.batch_size)
    images = decode(samples.latents[:count, -1]).cpu().numpy()
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(3 * columns, 3.3 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for i in range(count):
        axis = axes.flat[i]
        axis.imshow(images[i], interpolation="nearest")
        axis.set_title(f"{samples.prompts[i]}\nreward {float(samples.rewards[i]):.3f}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def save_reward_curve(history: list[dict[str, float]], path: Path) -> None:
    """Mean reward (with one standard deviation) per epoch; beside it the monitored figures, if any."""
    from matplotlib.figure import Figure

    epochs = np.arange(1, len(history) + 1)
    mean = np.array([h["charts/reward_mean"] for h in history])
    std = np.array([h["charts/reward_std"] for h in history])
    monitored = sorted({key for h in history for key in h if key.startswith("charts/monitor/")})
    figure = Figure(figsize=(11 if monitored else 6, 4))
    axes = figure.subplots(1, 2 if monitored else 1, squeeze=False)
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


# ---------------------------------------------------------------------------- training


def run_files(output_dir: Path) -> list[Path]:
    """What a run writes into its folder: checkpoints, pointer, TensorBoard events, images."""
    if not output_dir.is_dir():
        return []
    patterns = (f"{CHECKPOINT_PREFIX}*", f"{checkpoints.PARTIAL_PREFIX}*", checkpoints.LATEST, "tensorboard", "samples-*.png", "reward_curve.png")
    return sorted(path for pattern in patterns for path in output_dir.glob(pattern))


def prepare(config: TrainConfig, output_dir: Path, resume: bool = False, overwrite: bool = False) -> Run:
    """Checks everything that can be checked before training, then builds (or restores) the run.

    The output folder is created only once the set-up succeeded.

    Raises:
        ValueError: a model without a registered name, a device this machine lacks, or, on
            resume, settings that differ from the saved ones (each named with both values).
        FileNotFoundError: ``resume`` without a checkpoint in ``output_dir``.
        FileExistsError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    output_dir = Path(output_dir)
    config.to_tables()  # a run records plain names and values: refuse what it cannot record now
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other; allowed: one of them")
    if resume:
        saved = saved_config(output_dir)
        differences = resume_differences(saved, config)
        if differences:
            raise ValueError(
                f"--resume: the settings differ from the run saved in {output_dir}: " + "; ".join(differences)
                + ". Allowed changes on resume: " + ", ".join(f"[{t}] {k}" for t, k in RESUMABLE_CHANGES)
                + "; to train with other settings, start a new run (another --output-dir, or --overwrite)"
            )
    elif run_files(output_dir) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a run; allowed: --resume to continue it, --overwrite to replace it "
            "(its checkpoints, TensorBoard events and images are removed), or another --output-dir"
        )
    run = Run(config)
    if resume:
        run.load(output_dir)
        name = checkpoints.latest_name(output_dir)
        if run.processes.is_main:
            print(f"resuming {output_dir} from {name} (epoch {run.epoch} of {config.run.epochs})", flush=True)
    elif run.processes.is_main:
        for path in run_files(output_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if run.processes.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    run.processes.wait()
    return run


def run_training(run: Run, output_dir: Path) -> list[dict[str, float]]:
    """Trains ``run`` up to its config's epochs, logging, checkpointing and plotting into ``output_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    config = run.config
    # In a run of several processes rank 0 alone writes; every rank checkpoints (rank 0 writes).
    writes = run.processes.is_main
    writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=run.epoch + 1) if writes else None
    with tqdm(total=config.run.epochs, initial=run.epoch, desc=config.algorithm.name, disable=not writes) as progress:
        while run.epoch < config.run.epochs:
            started = time.perf_counter()
            figures, samples = run.train_epoch()
            figures["charts/epoch_seconds"] = time.perf_counter() - started
            run.history.append(figures)
            if writes:
                for key, value in figures.items():
                    writer.add_scalar(key, value, run.epoch)
                save_sample_grid(samples, run.policy.backend.decode, output_dir / f"samples-{run.epoch:04d}.png")
            if run.epoch % config.run.checkpoint_every == 0 or run.epoch == config.run.epochs:
                run.save(output_dir)
            progress.set_postfix(reward=f"{figures['charts/reward_mean']:.4f}")
            progress.update()
    if writes:
        writer.close()
        save_reward_curve(run.history, output_dir / "reward_curve.png")
    run.env.close()
    return run.history


def train(config: TrainConfig, output_dir: Path, resume: bool = False, overwrite: bool = False) -> list[dict[str, float]]:
    """Runs (or, with ``resume``, continues) training into ``output_dir``; returns the per-epoch figures.

    See :func:`prepare` for what is refused before training starts.
    """
    return run_training(prepare(config, output_dir, resume, overwrite), Path(output_dir))


# ---------------------------------------------------------------------------- command line


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[str, str]]]:
    """The parser of ``python -m agents.train`` and the config field each flag sets."""
    parser = argparse.ArgumentParser(
        prog="python -m agents.train",
        usage="%(prog)s --output-dir DIR [--config FILE] [--resume | --overwrite] [--SETTING VALUE ...] (all settings: --help)",
        description=__doc__.split("\n\n")[0],
        epilog="A flag overrides the config file; on --resume only the flags and file given count, over the saved config.",
    )
    parser.add_argument("--config", type=Path, help="TOML file with [run], [env], [reward], [advantages], [optimizer] and [algorithm] tables")
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints, logs and images")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir (its checkpoints, events and images)")
    return parser, add_flags(parser)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, bool, bool]:
    """The config, output folder and ``resume``/``overwrite`` of a command line; errors exit with status 2."""
    parser, destinations = build_parser()
    args = parser.parse_args(argv)
    try:
        given = read_config_file(args.config) if args.config else {}
        source = str(args.config) if args.config else "command line"
        if any(not isinstance(value, dict) for value in given.values()):
            TrainConfig.from_tables(given, source)  # refuses a flat file, saying how to convert it
        given = merge_tables(given, tables_from_flags(args, destinations))
        if args.resume:
            given = merge_tables(saved_config(args.output_dir).to_tables(), given)
        config = TrainConfig.from_tables(given, source)
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))
    return config, args.output_dir, args.resume, args.overwrite


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m agents.train``: set-up errors are one line on stderr with exit status 2; a
    reward that fails during training (e.g. an unreachable reward server) is one line with exit status 1."""
    config, output_dir, resume, overwrite = parse_args(argv)
    try:
        run = prepare(config, output_dir, resume, overwrite)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        build_parser()[0].error(str(error))
    try:
        history = run_training(run, output_dir)
    except RewardError as error:
        # A reward that failed (a reward server that died or answers garbage) is not a bug to
        # trace: say what failed, and that the run continues from its last checkpoint.
        sys.exit(f"python -m agents.train: error: {error}; the checkpoints in {output_dir} are intact: continue with --resume")
    if run.processes.is_main:
        print(json.dumps(history[-1], indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
