"""Learning benchmarks: does fine-tuning through the environment improve the built-in model?

Runs are made with the training command (each is its own job, resumable with ``--resume``):

    python -m agents.train --config agents/configs/compressibility.toml --output-dir runs/compressibility

This script then compares each run's final policy with the pretrained model on the same prompts
and the same initial noise (paired samples, with the run's sampler and number of steps), and prints a
markdown table:

    python benchmarks/learning.py runs/compressibility runs/incompressibility --out docs/learning

A run given as ``DIR:EPOCH`` is evaluated at that epoch's checkpoint and its curve cut there, so
that runs of different lengths are compared at the same number of reward queries.

- ``jpeg_kb``: mean JPEG size (quality 95) of the samples, the quantity the JPEG rewards move;
- ``scene_*``: agreement of the scene parser with the prompt (background colour, shape colour,
  shape, count, size) and ``scene_alignment`` their mean, the check that the samples still show
  the prompted scene;
- on the run's training prompt set and on held-out prompts never trained on (by default the
  training set's counterpart: ``scenes_heldout_three`` for ``scenes_train_three``; ``--heldout``);
- the paired change of JPEG size, count agreement and alignment: the mean over samples of
  fine-tuned minus pretrained (same prompt and noise) with its standard error;
- the KL from the fine-tuned model to the pretrained one, in nats per trajectory: the exact KL of
  the two models' Gaussian transitions summed over the steps of each fine-tuned sample's path,
  averaged over the samples (by the chain rule of the KL, an estimate of the KL between the two
  distributions of whole trajectories).

With ``--out`` it also writes, per run, a grid of pretrained (top) and fine-tuned (bottom)
samples for the same prompts and noise, the curves of training reward and of the monitored
prompt agreement per reward query, and, with ``--compare``, one plot of the reward curves of
all runs against reward queries (SF vs IS vs RWR, or SB3's PPO beside DDPO-IS), and the
reward/KL frontier: each run's changes against its KL to the pretrained model. Runs whose
settings differ only in their ``[run]`` table (seed, length, checkpointing) are seeds of one
setting: the comparison draws their mean curve with a band from the lowest to the highest seed,
and a second table gives each setting's final figures as the mean over seeds and their standard
deviation (``--compare``). An output
directory of ``examples/sb3_ppo.py`` (``actor.safetensors``, ``args.json``, ``history.json``) is
evaluated like a training run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from agents.config import TrainConfig
from agents.policy import GaussianDenoisingPolicy
from agents.rollouts import Trajectories, collect_trajectories
from agents.runs import has_checkpoint, load_run
from agents.train import Run
from diffusion_env.images import image_grid
from diffusion_env.shapes import heldout_counterpart
from diffusion_env.rewards import jpeg_size_kb, make_reward

BATCH = 16


def parse_run(argument: str) -> tuple[Path, int | None]:
    """``DIR`` or ``DIR:EPOCH``."""
    directory, _, epoch = argument.partition(":")
    return Path(directory), int(epoch) if epoch else None


def run_label(run_dir: Path, epoch: int | None) -> str:
    return run_dir.name if epoch is None else f"{run_dir.name}@{epoch}"


def is_sb3_run(run_dir: Path) -> bool:
    """An output directory of ``examples/sb3_ppo.py`` (weights, arguments and history)."""
    return (run_dir / "actor.safetensors").exists() and (run_dir / "args.json").exists()


def run_config(run_dir: Path) -> TrainConfig:
    """The run's training config; for an SB3 run, one that builds the same model, sampler and reward."""
    if is_sb3_run(run_dir):
        args = json.loads((run_dir / "args.json").read_text())
        return TrainConfig.from_tables(
            {
                "env": {"model": args["model"], "num_inference_steps": args["num_inference_steps"]},
                "reward": {"name": args["reward"]},
                "optimizer": {"lora_rank": args["lora_rank"]},
            },
            source=str(run_dir / "args.json"),
        )
    return load_run(run_dir).config


def run_history(run_dir: Path, epoch: int | None = None) -> list[dict[str, float]]:
    """The per-update figures of a training run (up to ``epoch``) or of a ``history.json``."""
    if (run_dir / "history.json").exists():
        history = json.loads((run_dir / "history.json").read_text())
    else:
        history = load_run(run_dir).history
    return history if epoch is None else history[:epoch]


@torch.no_grad()
def sample(
    config: TrainConfig, run_dir: Path | None, epoch: int | None, prompts: str, num_samples: int, seed: int
) -> tuple[Trajectories, GaussianDenoisingPolicy]:
    """``num_samples`` samples on ``prompts`` from the run's policy after ``epoch`` (default: the
    last; the pretrained model if ``run_dir`` is None), and that policy.

    Prompts and initial noise depend on ``seed`` only, so two calls with the same seed are paired.
    """
    changes = {
        "env": {"prompts": prompts, "prompt_file": None, "num_envs": BATCH, "samples_per_prompt": 1},
        "reward": {"monitor": None},
    }
    if run_dir is not None and not is_sb3_run(run_dir):
        run = load_run(run_dir, epoch).build_run(changes)
    else:
        run = Run(config.with_changes(changes), reference=False)
    if run_dir is not None and is_sb3_run(run_dir):
        unused = run.policy.load_state_dict(load_file(run_dir / "actor.safetensors"), strict=False).unexpected_keys
        if unused:
            raise ValueError(f"{run_dir}/actor.safetensors holds parameters this model lacks: {unused[:3]}")
    generator = torch.Generator(device=config.run.device).manual_seed(seed)
    batches = [
        collect_trajectories(run.env, run.policy, generator=generator, seed=seed + index)
        for index in range(num_samples // BATCH)
    ]
    run.env.close()
    return Trajectories.concatenate(batches), run.policy


@torch.no_grad()
def path_kl(samples: Trajectories, policy: GaussianDenoisingPolicy, pretrained: GaussianDenoisingPolicy) -> np.ndarray:
    """Each sample's KL from ``policy`` to ``pretrained`` summed over the steps of its own path, in nats.

    Each term is the exact KL of the two models' Gaussian transitions from the sample's x_t
    (``sampler.kl_divergence``); by the chain rule of the KL, their sum's mean over samples drawn
    from ``policy`` estimates the KL between the two models' distributions of whole trajectories
    (same prompt and x_T), the fidelity a reward is bought with.
    """
    batch, steps = samples.timesteps.shape
    total = torch.zeros(batch, dtype=torch.float64)
    for start in range(0, batch, BATCH):
        index = torch.arange(start, min(start + BATCH, batch), device=samples.latents.device)
        for k in range(steps):
            step = torch.full_like(index, k)
            observation = samples.observations(index, step)
            kl = policy.sampler.kl_divergence(policy.mean(observation), pretrained.mean(observation), step)
            total[start : start + len(index)] += kl.double().cpu()
    return total.numpy()


def per_sample_figures(samples: Trajectories) -> dict[str, np.ndarray]:
    """Each sample's JPEG size, scene alignment and agreement per attribute (NaN where its prompt
    names no such attribute)."""
    result = make_reward("scene_alignment")(samples.images, samples.prompts, samples.metadata)
    return {
        "jpeg_kb": np.asarray(jpeg_size_kb(samples.images)),
        "scene_alignment": result.rewards.cpu().numpy(),
        **result.details,
    }


def means_of(figures: dict[str, np.ndarray]) -> dict[str, float]:
    """Each figure's mean over the samples where it is defined; NaN where it is defined for none,
    so that every table column exists."""
    return {key: float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan") for key, values in figures.items()}


def paired_change(pretrained: np.ndarray, fine_tuned: np.ndarray) -> tuple[float, float]:
    """Mean per-sample change from pretrained to fine-tuned and its standard error.

    The two models are sampled with the same prompts and noise, so the difference of each pair
    carries less noise than the difference of two independent means. Only pairs defined in both
    count (the count agreement only where the prompt names a count); the mean is NaN when no pair
    is defined, and the standard error NaN below two pairs.
    """
    defined = np.isfinite(pretrained) & np.isfinite(fine_tuned)
    differences = (fine_tuned - pretrained)[defined].astype(np.float64)
    mean = float(differences.mean()) if differences.size else float("nan")
    error = float(differences.std(ddof=1) / np.sqrt(differences.size)) if differences.size > 1 else float("nan")
    return mean, error


def save_pair_grid(pretrained: Trajectories, fine_tuned: Trajectories, path: Path, count: int = 12) -> None:
    import matplotlib.pyplot as plt

    pixels = image_grid(
        np.concatenate([pretrained.images[:count].cpu().numpy(), fine_tuned.images[:count].cpu().numpy()]),
        columns=count,
        padding=1,
        fill=255,
    )
    plt.imsave(path, np.kron(pixels, np.ones((3, 3, 1), dtype=np.uint8)))


def save_curves(history: list[dict[str, float]], title: str, path: Path) -> None:
    """Training reward and monitored prompt agreement per reward query, side by side."""
    import matplotlib.pyplot as plt

    queries = [h["charts/reward_queries"] for h in history]
    monitored = sorted({k for h in history for k in h if k.startswith("charts/monitor/scene_")})
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].plot(queries, [h["charts/reward_mean"] for h in history], marker=".")
    axes[0].set_ylabel("training reward (mean of the epoch)")
    for key in monitored:
        axes[1].plot(queries, [h.get(key, np.nan) for h in history], marker=".", label=key.removeprefix("charts/monitor/"))
    axes[1].set_ylabel("scene parser agreement (not trained on)")
    axes[1].set_ylim(0, 1.02)
    if monitored:
        axes[1].legend(fontsize=7, loc="lower left")
    for axis in axes:
        axis.set_xlabel("reward queries")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def smoothed(history: list[dict[str, float]], window: float, key: str = "charts/reward_mean") -> tuple[np.ndarray, np.ndarray]:
    """Reward queries and the mean of ``key`` over the last ``window`` queries (each update weighted by its queries)."""
    queries = np.array([h["charts/reward_queries"] for h in history])
    counts = np.diff(queries, prepend=0.0)
    values = np.array([h[key] for h in history])
    means = []
    for index, end in enumerate(queries):
        recent = queries[: index + 1] > end - window
        means.append(float(np.sum(values[: index + 1][recent] * counts[: index + 1][recent]) / np.sum(counts[: index + 1][recent])))
    return queries, np.array(means)


MONITORED_ALIGNMENT = "charts/monitor/scene_alignment"
# The env settings that say how many samples are drawn and how, not from which model and sampler.
SAMPLE_LAYOUT = ("prompts", "prompt_file", "num_envs", "samples_per_prompt", "batches_per_epoch", "shared_noise", "branch_step")
# Figures whose paired change (fine-tuned minus pretrained, same prompts and noise) is tabulated.
CHANGED = ("jpeg_kb", "scene_count", "scene_alignment")


def algorithm_name(run_dir: Path, config: TrainConfig) -> str:
    return "sb3-ppo" if is_sb3_run(run_dir) else config.algorithm.name


def seed_groups(configs: dict[str, tuple[str, TrainConfig]]) -> dict[str, list[str]]:
    """The runs (label: algorithm and config) grouped by their algorithm and settings other than
    the ``[run]`` table, so that the seeds of one setting form one group; each group is named after
    its algorithm and reward, and where two groups share those, after the settings in which it
    differs from the others of that name (e.g. ``kl_coefficient=0.0``); in the order of the runs given."""
    settings: dict[str, list[str]] = {}
    flat: dict[str, dict[str, str]] = {}
    for label, (algorithm, config) in configs.items():
        tables = {name: table for name, table in config.to_tables().items() if name != "run"}
        key = json.dumps([algorithm, tables], sort_keys=True, default=str)
        settings.setdefault(key, []).append(label)
        flat[key] = {f"{table}.{name}": json.dumps(value, default=str) for table, entries in tables.items() for name, value in entries.items()}
    names = {key: f"{configs[labels[0]][0]}, {configs[labels[0]][1].reward.name}" for key, labels in settings.items()}
    groups = {}
    for key, labels in settings.items():
        namesakes = [other for other in settings if names[other] == names[key]]
        differing = sorted(name for name in flat[key] if len({flat[other].get(name) for other in namesakes}) > 1)
        suffix = ", ".join(f"{name.partition('.')[2]}={json.loads(flat[key][name])}" for name in differing)
        groups[f"{names[key]}, {suffix}" if suffix else names[key]] = labels
    return groups


def save_comparison(
    histories: dict[str, list[dict[str, float]]], groups: dict[str, list[str]], path: Path, window: float
) -> None:
    """The training reward per reward query of each group of seeds (see :func:`seed_groups`),
    averaged over ``window`` queries: a single run as its line over its raw per-update values
    (faint), several seeds as the mean of their lines with a band from the lowest to the highest
    seed, cut at the shortest seed; beside it the monitored prompt alignment where it was logged."""
    import matplotlib.pyplot as plt

    monitored = {name: labels for name, labels in groups.items() if MONITORED_ALIGNMENT in histories[labels[0]][0]}
    figure, axes = plt.subplots(1, 2 if monitored else 1, figsize=(12 if monitored else 7, 4.2), squeeze=False)
    panels = [(axes[0, 0], groups, "charts/reward_mean", "training reward")]
    if monitored:
        panels.append((axes[0, 1], monitored, MONITORED_ALIGNMENT, "prompt alignment of the training samples"))
    for axis, shown, key, name in panels:
        for group, labels in shown.items():
            color = f"C{list(groups).index(group)}"
            if len(labels) == 1:
                history = histories[labels[0]]
                queries, means = smoothed(history, window, key)
                axis.plot(queries, [h[key] for h in history], color=color, alpha=0.25, linewidth=0.8)
                axis.plot(queries, means, color=color, label=group)
                continue
            length = min(len(histories[label]) for label in labels)
            curves = [smoothed(histories[label][:length], window, key) for label in labels]
            queries = curves[0][0]
            if any(not np.array_equal(queries, other) for other, _ in curves[1:]):
                raise SystemExit(f"the seeds of {group} ({', '.join(labels)}) logged different reward queries per update")
            values = np.stack([means for _, means in curves])
            axis.fill_between(queries, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2, linewidth=0)
            axis.plot(queries, values.mean(axis=0), color=color, label=f"{group} ({len(labels)} seeds)")
        axis.set_xlabel("reward queries")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(
        f"mean over the last {window:g} reward queries; faint: per update (one seed); band: lowest to highest seed",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_frontier(results: dict[str, dict], groups: dict[str, list[str]], path: Path) -> None:
    """What each run's reward cost in fidelity: the paired change of JPEG size (left) and of prompt
    alignment (right) on its training prompts against its KL to the pretrained model, one point
    per run with standard errors, coloured by its group of seeds (as in the comparison plot)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for index, (group, labels) in enumerate(groups.items()):
        for label in (label for label in labels if label in results):
            result = results[label]
            prompts = result["config"]["env"]["prompts"]
            kl = result[f"{prompts}/kl_to_pretrained"]
            for axis, key in zip(axes, ("jpeg_kb", "scene_alignment")):
                change = result[f"{prompts}/change"][key]
                axis.errorbar(kl["mean"], change["mean"], xerr=kl["standard_error"], yerr=change["standard_error"],
                              fmt="o", color=f"C{index % 10}", label=group if label == labels[0] else None, capsize=2)
    for axis, name in zip(axes, ("change of JPEG size (kB)", "change of prompt alignment")):
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xlabel("KL to the pretrained model (nats per trajectory)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.suptitle("training prompts, paired with the pretrained model's samples (same prompts and noise)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def over_seeds(values: list[float], signed: bool = True) -> str:
    """``mean ± standard deviation`` over seeds (the deviation of one seed is not defined)."""
    array = np.asarray(values, dtype=np.float64)
    mean = f"{array.mean():+.3f}" if signed else f"{array.mean():.3f}"
    return f"{mean} ± {array.std(ddof=1):.3f}" if array.size > 1 else mean


def print_over_seeds(results: dict[str, dict], groups: dict[str, list[str]]) -> None:
    """A table of each group's final figures: the paired changes and the fine-tuned background
    agreement, as the mean over its seeds ± their standard deviation (the spread between seeds,
    which the paired standard errors of single runs do not show)."""
    print("\n| setting | seeds | prompts | " + " | ".join(f"change of {key}" for key in CHANGED) + " | background |")
    print("|---" * (4 + len(CHANGED)) + "|")
    for group, labels in groups.items():
        evaluated = [label for label in labels if label in results]
        if not evaluated:
            continue
        prompt_sets = [key.removesuffix("/change") for key in results[evaluated[0]] if key.endswith("/change")]
        for prompts in prompt_sets:
            changes = [over_seeds([results[label][f"{prompts}/change"][key]["mean"] for label in evaluated]) for key in CHANGED]
            background = over_seeds([results[label][f"{prompts}/fine-tuned"]["scene_background"] for label in evaluated], signed=False)
            print(f"| {group} | {len(evaluated)} | {prompts} | " + " | ".join(changes) + f" | {background} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output directories of agents.train (DIR or DIR:EPOCH)")
    parser.add_argument("--samples", type=int, default=128, help=f"evaluation samples per prompt set (multiple of {BATCH})")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the evaluation prompts and noise")
    parser.add_argument(
        "--heldout",
        default="auto",
        help="prompt set never trained on; 'auto': the training set's held-out counterpart; '' to skip",
    )
    parser.add_argument("--out", type=Path, help="folder for the figures and results.json")
    parser.add_argument("--compare", action="store_true", help="also plot all runs' reward curves together, seeds of one setting as a band, and tabulate the spread over seeds")
    parser.add_argument("--window", type=float, default=320, help="reward queries averaged in the comparison plot")
    args = parser.parse_args()
    if args.samples < BATCH or args.samples % BATCH:
        raise SystemExit(f"--samples={args.samples}; allowed: a positive multiple of {BATCH}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    # Runs of one model and sampler share its pretrained samples and policy.
    pretrained_samples: dict[str, tuple[Trajectories, GaussianDenoisingPolicy]] = {}
    print(
        "| run | algorithm | reward | epochs | reward queries | train minutes | prompts | model | jpeg_kb | background"
        " | colour | shape | count | size | alignment | change of jpeg_kb | change of count | change of alignment"
        " | KL to pretrained (nats) |"
    )
    print("|---" * 19 + "|")
    runs = [parse_run(argument) for argument in args.runs]
    histories: dict[str, list[dict[str, float]]] = {}
    configs: dict[str, tuple[str, TrainConfig]] = {}  # of the runs evaluated: algorithm and config
    for run_dir, epoch in runs:
        label = run_label(run_dir, epoch)
        history = histories[label] = run_history(run_dir, epoch)
        if not has_checkpoint(run_dir) and not is_sb3_run(run_dir):
            print(f"| {label} | (no checkpoint: curve only) |", flush=True)
            continue
        config = run_config(run_dir)
        algorithm = algorithm_name(run_dir, config)
        configs[label] = (algorithm, config)
        minutes = sum(h.get("charts/epoch_seconds", float("nan")) for h in history) / 60
        trained_on = config.env.prompts
        heldout = heldout_counterpart(trained_on) if args.heldout == "auto" else args.heldout
        prompt_sets = [trained_on] + ([heldout] if heldout and heldout != trained_on else [])
        results[label] = {"config": config.to_tables(), "epochs": len(history), "train_minutes": minutes}
        for prompts in prompt_sets:
            sampling = {name: value for name, value in config.to_tables()["env"].items() if name not in SAMPLE_LAYOUT}
            key = json.dumps([sampling, prompts], sort_keys=True, default=str)
            if key not in pretrained_samples:
                pretrained_samples[key] = sample(config, None, None, prompts, args.samples, args.seed)
            pretrained, pretrained_policy = pretrained_samples[key]
            fine_tuned, policy = sample(config, run_dir, epoch, prompts, args.samples, args.seed)
            per_sample = {"pretrained": per_sample_figures(pretrained), "fine-tuned": per_sample_figures(fine_tuned)}
            changes = {key: paired_change(per_sample["pretrained"][key], per_sample["fine-tuned"][key]) for key in CHANGED}
            results[label][f"{prompts}/change"] = {key: {"mean": mean, "standard_error": error} for key, (mean, error) in changes.items()}
            kl = path_kl(fine_tuned, policy, pretrained_policy)
            kl_figures = {"mean": float(kl.mean()), "standard_error": float(kl.std(ddof=1) / np.sqrt(kl.size))}
            results[label][f"{prompts}/kl_to_pretrained"] = kl_figures
            kl_cell = f"{kl_figures['mean']:.1f} ± {kl_figures['standard_error']:.1f}"
            for model, figures in per_sample.items():
                means = means_of(figures)
                results[label][f"{prompts}/{model}"] = means
                change_cells = " | ".join(
                    f"{changes[key][0]:+.3f} ± {changes[key][1]:.3f}" if model == "fine-tuned" else "" for key in CHANGED
                ) + (f" | {kl_cell}" if model == "fine-tuned" else " | ")
                print(
                    f"| {label} | {algorithm} | {config.reward.name} | {len(history)} | "
                    f"{int(history[-1]['charts/reward_queries'])} | {minutes:.1f} | {prompts} | {model} | "
                    f"{means['jpeg_kb']:.3f} | {means['scene_background']:.3f} | {means['scene_color']:.3f} | "
                    f"{means['scene_shape']:.3f} | {means['scene_count']:.3f} | {means['scene_size']:.3f} | "
                    f"{means['scene_alignment']:.3f} | {change_cells} |",
                    flush=True,
                )
            if args.out:
                save_pair_grid(pretrained, fine_tuned, args.out / f"{label}_{prompts}_samples.png")
        if args.out:
            save_curves(history, f"{label}: {algorithm} on {config.reward.name}", args.out / f"{label}_curves.png")
    if args.compare:
        # A run without a config (its curve only) is a group of its own.
        groups = seed_groups(configs) | {label: [label] for label in histories if label not in configs}
        print_over_seeds(results, groups)
        if args.out:
            save_comparison(histories, groups, args.out / "comparison.png", args.window)
            save_frontier(results, groups, args.out / "frontier.png")
    if args.out:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
