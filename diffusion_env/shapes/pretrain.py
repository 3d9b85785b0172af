"""Pretraining of the built-in model from scratch: ``python -m diffusion_env.shapes.pretrain``.

Trains the ``UNet2DConditionModel`` of :mod:`diffusion_env.shapes.model` on procedural scenes
generated on the fly (:func:`diffusion_env.shapes.scenes.sample_training_batch`) with the MSE of
its objective's regression target (``--prediction-type``: v-prediction for ``shapes32``, epsilon,
or ``flow``, the rectified-flow velocity of its twin ``shapes32-flow``), keeps an exponential
moving average (EMA) of its weights, and exports the EMA network with ``save_pretrained`` to the
package's weights directory of that objective. The noisy inputs and targets are those of the
environment's own sampler of the objective's scheduler (``training_timesteps``, ``noisy_latents``,
``regression_target``), the ones RWR trains with.

A run is resumable: every ``--checkpoint-every`` steps the UNet, the EMA weights (safetensors),
the optimizer, every random-number generator and the loss history (``torch.save``, read back with
``weights_only=True``) are written into a new step directory through
:mod:`diffusion_env.checkpoints`, which makes it current only through an atomic rename and an
atomically replaced ``latest`` pointer, so an interrupted write never damages the previous
checkpoint. ``--resume`` continues the run bit for bit, as if it had never stopped.

``--evaluate`` samples images for train prompts with the environment's default sampler (DDIM with
eta = 1 for the DDPM objectives, Flow-GRPO's SDE for flow; 20 steps) at one or more guidance scales, reads them back with the scene parser and reports how
often each attribute matches the prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from diffusion_env import checkpoints
from diffusion_env.shapes import model as builtin_model, scenes
from diffusion_env.images import image_grid
from diffusion_env.backends.pixel_unet import PixelUNetDenoiser
from diffusion_env.backends.text_encoders import TransformerPromptEncoder
from diffusion_env.samplers import Sampler, make_sampler
from diffusion_env.samplers.flow import FlowSampler

#: Completed checkpoints kept on disk (older ones are deleted once a newer one is current).
CHECKPOINTS_KEPT: int = 2


@dataclass
class TrainConfig:
    """Settings of one pretraining run (the command-line options, see :func:`build_parser`).

    ``unet_config`` replaces :func:`builtin_model.unet_config` (tests use a tiny one). Every field
    is stored in the checkpoints; on resume the stored settings win, except those named in
    ``RESUMABLE_CHANGES`` (e.g. more ``steps`` to extend a run).
    """

    output_dir: Path
    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    snr_gamma: float = 5.0
    prediction_type: str = builtin_model.scheduler_config()["prediction_type"]
    seed: int = 0
    checkpoint_every: int = 250
    threads: int | None = None
    export_dir: Path | None = builtin_model.WEIGHTS_DIR
    unet_config: dict[str, Any] = field(default_factory=builtin_model.unet_config)

    #: Fields that may differ between the stored run and the resuming command.
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every", "threads", "export_dir", "output_dir")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready copy (paths as strings, tuples as lists)."""
        data = asdict(self)
        data["output_dir"] = str(self.output_dir)
        data["export_dir"] = None if self.export_dir is None else str(self.export_dir)
        return json.loads(json.dumps(data))


@dataclass
class TrainState:
    """Everything that changes during a run: the objects a checkpoint must restore."""

    unet: UNet2DConditionModel
    ema: EMAModel
    optimizer: torch.optim.AdamW
    data_rng: np.random.Generator
    noise_generator: torch.Generator
    step: int = 0
    losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------- the run


def _check_config(config: TrainConfig) -> None:
    """Raises ValueError for settings that cannot make a run, before any time is spent."""
    if config.steps < 1 or config.batch_size < 1 or config.checkpoint_every < 1:
        raise ValueError(
            f"steps, batch_size and checkpoint_every must be >= 1, got {config.steps}, "
            f"{config.batch_size}, {config.checkpoint_every}"
        )
    if not 0.0 <= config.cfg_dropout < 1.0:
        raise ValueError(f"cfg_dropout must be in [0, 1), got {config.cfg_dropout}")
    if config.lr <= 0 or not math.isfinite(config.lr):
        raise ValueError(f"lr must be a positive number, got {config.lr}")
    if config.prediction_type not in builtin_model.PREDICTION_TYPES:
        raise ValueError(f"prediction_type={config.prediction_type!r}; allowed: {list(builtin_model.PREDICTION_TYPES)}")
    own_folder = builtin_model.weights_dir_of(config.prediction_type)
    for folder in {builtin_model.WEIGHTS_DIR, builtin_model.FLOW_WEIGHTS_DIR} - {own_folder}:
        if config.export_dir is not None and Path(config.export_dir).resolve() == folder:
            raise ValueError(
                f"export_dir {folder} holds the shipped weights of another objective than {config.prediction_type!r}; "
                f"allowed: {own_folder} or a folder of your own"
            )


def new_state(config: TrainConfig) -> TrainState:
    """A freshly initialised run: seeded UNet, EMA copy, AdamW, data and noise generators."""
    with torch.random.fork_rng(devices=[]):
        # The initial weights depend on the seed only, not on what the process did before.
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(**config.unet_config)
    unet.train()
    ema = EMAModel(
        unet.parameters(),
        decay=config.ema_decay,
        # The warm-up (decay 1 - (1 + n)^(-2/3)) lets the average forget the random
        # initialisation within a few hundred steps, which matters for runs this short.
        use_ema_warmup=True,
        power=2 / 3,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    noise_generator = torch.Generator().manual_seed(config.seed)
    # Distinct streams for scenes and for noise, both derived from the one seed.
    data_rng = np.random.default_rng([config.seed, 1])
    return TrainState(unet, ema, optimizer, data_rng, noise_generator)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then constant.

    A function of the step alone, so a resumed run needs no scheduler state. The warm-up lets
    AdamW's second-moment estimates settle before the (large, for a diffusion model) peak rate.
    """
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` to float ``(B, 3, H, W)`` in [-1, 1], the inverse of ``decode``."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _loss_weights(sampler: Sampler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample weights of the MSE: 1, or for the DDPM objectives min-SNR-gamma (Hang et al., 2023).

    Min-SNR caps the weight that the loss puts on the clean-image error at gamma: for epsilon
    prediction a sample is weighted by min(SNR_t, gamma) / SNR_t, for v-prediction by
    min(SNR_t, gamma) / (SNR_t + 1). Both lower nearly clean timesteps (fine detail) relative to
    the noisy ones where colours and layout are decided. The flow objective weights every t alike
    (rectified flow's plain velocity MSE).
    """
    if snr_gamma <= 0 or isinstance(sampler, FlowSampler):
        return torch.ones(timesteps.shape[0])
    scheduler = sampler.scheduler
    alphas_cumprod = scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    if scheduler.config.prediction_type == "v_prediction":
        return snr.clamp(max=snr_gamma) / (snr + 1.0)
    return snr.clamp(max=snr_gamma) / snr


def train_step(
    state: TrainState,
    config: TrainConfig,
    sampler: Sampler,
    prompt_encoder: TransformerPromptEncoder,
) -> float:
    """One optimisation step on a fresh batch; returns the batch loss."""
    images, captions, _ = scenes.sample_training_batch(
        state.data_rng, config.batch_size, size=config.unet_config["sample_size"]
    )
    clean = _images_to_tensor(images)
    generator = state.noise_generator
    # Classifier-free guidance needs the unconditional model too: the empty prompt stands for it.
    dropped = torch.rand(config.batch_size, generator=generator) < config.cfg_dropout
    captions = ["" if drop else text for drop, text in zip(dropped.tolist(), captions)]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = sampler.training_timesteps(config.batch_size, generator)
    noisy = sampler.noisy_latents(clean, noise, timesteps)
    # One prompt per encoder call: a batched call pads and multiplies differently per batch, and
    # the per-prompt cache would then make the embeddings depend on the run's history, breaking
    # bit-exact resumption.
    prompt_embeds = torch.cat([prompt_encoder([text]) for text in captions])

    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(config, state.step)
    target = sampler.regression_target(clean, noise, timesteps)
    prediction = state.unet(noisy, timesteps, encoder_hidden_states=prompt_embeds).sample
    per_sample = (prediction - target).square().mean(dim=(1, 2, 3))
    loss = (per_sample * _loss_weights(sampler, timesteps, config.snr_gamma)).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {state.step}")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.unet.parameters(), config.grad_clip)
    state.optimizer.step()
    state.ema.step(state.unet.parameters())
    state.step += 1
    value = float(loss.item())
    state.losses.append(value)
    return value


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainState:
    """Runs (or, with ``resume``, continues) pretraining up to ``config.steps`` steps.

    Writes checkpoints and ``loss.png`` under ``config.output_dir`` and, at the end, exports the
    EMA UNet to ``config.export_dir`` (when not None).

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint in ``output_dir``.
    """
    _check_config(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if resume:
        config, state = load_checkpoint(config.output_dir, config)
    else:
        state = new_state(config)
    # Only the sampler's training functions are used: its number of steps does not matter.
    sampler = make_sampler(builtin_model.make_scheduler(config.prediction_type), num_inference_steps=20)
    prompt_encoder = builtin_model.make_prompt_encoder()
    config.output_dir.mkdir(parents=True, exist_ok=True)
    (config.output_dir / "config.json").write_text(json.dumps(config.to_json(), indent=2))

    bar = tqdm(total=config.steps, initial=state.step, desc="pretrain", disable=not progress, dynamic_ncols=True)
    running: float | None = None
    while state.step < config.steps:
        loss = train_step(state, config, sampler, prompt_encoder)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{learning_rate(config, state.step - 1):.1e}")
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            save_checkpoint(state, config)
            plot_losses(state.losses, config.output_dir / "loss.png")
    bar.close()
    if config.export_dir is not None:
        export_ema(state, config)
    return state


# ---------------------------------------------------------------------------------- checkpoints


def _checkpoint_root(output_dir: Path) -> Path:
    """Directory holding a run's step directories and its ``latest`` pointer."""
    return Path(output_dir) / "checkpoints"


def save_checkpoint(state: TrainState, config: TrainConfig) -> Path:
    """Writes the run's state as ``checkpoints/step-XXXXXXX`` and makes it the current one.

    Through :func:`diffusion_env.checkpoints.write_checkpoint`: the files go into a temporary
    directory that is renamed into place only when complete, then the ``latest`` pointer is
    replaced atomically, so a crash at any point leaves the previous checkpoint current and
    intact. Only the last :data:`CHECKPOINTS_KEPT` checkpoints are kept.
    """
    names = [n for n, _ in state.unet.named_parameters()]
    return checkpoints.write_checkpoint(
        _checkpoint_root(config.output_dir),
        f"step-{state.step:07d}",
        weights={"unet": state.unet.state_dict(), "ema": dict(zip(names, state.ema.shadow_params))},
        state={
            "step": state.step,
            "config": config.to_json(),
            "optimizer": state.optimizer.state_dict(),
            "ema": {k: v for k, v in state.ema.state_dict().items() if k != "shadow_params"},
            "data_rng": state.data_rng.bit_generator.state,
            "noise_generator": state.noise_generator.get_state(),
            "losses": list(state.losses),
        },
        keep_last=CHECKPOINTS_KEPT,
    )


def latest_checkpoint(output_dir: Path) -> Path:
    """Directory of the current checkpoint of the run in ``output_dir``.

    Raises:
        FileNotFoundError: when the run has no completed checkpoint.
    """
    root = _checkpoint_root(output_dir)
    try:
        return checkpoints.find_checkpoint(root)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no checkpoint in {root}; start a run with `python -m diffusion_env.shapes.pretrain "
            f"--output-dir {output_dir}` (without --resume)"
        ) from None


def load_checkpoint(output_dir: Path, overrides: TrainConfig | None = None) -> tuple[TrainConfig, TrainState]:
    """The stored run's config and its state at the current checkpoint.

    Args:
        output_dir: the run's output directory.
        overrides: a config whose :attr:`TrainConfig.RESUMABLE_CHANGES` fields replace the stored
            ones (e.g. more ``steps`` to extend a run); its other fields are ignored.
    """
    path = latest_checkpoint(output_dir)
    blob = checkpoints.read_state(path)
    stored = blob["config"]
    stored["output_dir"] = Path(stored["output_dir"])
    stored["export_dir"] = None if stored["export_dir"] is None else Path(stored["export_dir"])
    config = TrainConfig(**stored)
    if overrides is not None:
        for name in TrainConfig.RESUMABLE_CHANGES:
            setattr(config, name, getattr(overrides, name))
    state = new_state(config)
    state.unet.load_state_dict(checkpoints.read_weights(path, "unet"))
    shadow = checkpoints.read_weights(path, "ema")
    names = [n for n, _ in state.unet.named_parameters()]
    state.ema.load_state_dict({**blob["ema"], "shadow_params": [shadow[n] for n in names]})
    state.optimizer.load_state_dict(blob["optimizer"])
    state.data_rng.bit_generator.state = blob["data_rng"]
    state.noise_generator.set_state(blob["noise_generator"])
    state.step = int(blob["step"])
    state.losses = list(blob["losses"])
    return config, state


def ema_unet(state: TrainState) -> UNet2DConditionModel:
    """A separate UNet holding the EMA weights (the training UNet is left as it is)."""
    unet = UNet2DConditionModel.from_config(state.unet.config)
    state.ema.copy_to(unet.parameters())
    return unet.eval()


def export_ema(state: TrainState, config: TrainConfig, export_dir: Path | None = None) -> Path:
    """Saves the EMA UNet with ``save_pretrained`` (config.json + safetensors) and the scheduler
    it was trained with (scheduler_config.json) to ``export_dir`` (default: the config's)."""
    export_dir = Path(export_dir if export_dir is not None else config.export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    ema_unet(state).save_pretrained(export_dir, safe_serialization=True)
    builtin_model.make_scheduler(config.prediction_type).save_pretrained(export_dir)
    return export_dir


def plot_losses(losses: Sequence[float], path: Path) -> None:
    """Saves the loss curve (raw per-step losses and a 100-step moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt

    values = np.asarray(losses, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(values) + 1), values, lw=0.5, alpha=0.35, label="per step")
    window = min(100, len(values))
    if window > 1:
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(values) + 1), smooth, lw=1.5, label=f"{window}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE of the prediction")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    checkpoints.atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sample_images(
    denoiser: PixelUNetDenoiser,
    prompts: Sequence[str],
    guidance_scale: float,
    seed: int = 0,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    batch_size: int = 64,
) -> np.ndarray:
    """uint8 images ``(N, H, W, 3)`` for ``prompts`` with the environment's default sampler of the
    denoiser's scheduler, with ``num_inference_steps`` (the environment's default: 20) and, for
    DDIM, ``eta`` (default 1.0).
    """
    options = {} if isinstance(denoiser.scheduler, FlowMatchEulerDiscreteScheduler) else {"eta": eta}
    sampler = make_sampler(denoiser.scheduler, num_inference_steps, **options)
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        embeds = denoiser.encode_prompts(batch)
        latents = torch.randn((len(batch), *denoiser.latent_shape), generator=generator)
        for k in range(num_inference_steps):
            step = torch.full((len(batch),), k)
            output = denoiser.predict(latents, sampler.timesteps[step], embeds, guidance_scale)
            mean = sampler.mean(latents, output, step)
            latents = sampler.sample(mean, step, torch.randn(latents.shape, generator=generator))
        chunks.append(denoiser.decode(latents).cpu().numpy())
    return np.concatenate(chunks)


def evaluation_prompts(num_samples: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``num_samples`` train prompts drawn with a fixed seed (without replacement while possible)."""
    pool = scenes.train_prompts()
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-num_samples // len(pool)))])
    return [pool[i] for i in order[:num_samples]]


def evaluate(
    denoiser: PixelUNetDenoiser,
    prompts: Sequence[tuple[str, dict[str, Any]]],
    guidance_scale: float,
    seed: int = 0,
) -> tuple[dict[str, float], np.ndarray]:
    """Attribute agreement (fraction per attribute, see ``scenes.attribute_agreement``) of
    samples for ``prompts`` at ``guidance_scale``, and the samples themselves."""
    images = sample_images(denoiser, [text for text, _ in prompts], guidance_scale, seed=seed)
    agreement = scenes.attribute_agreement(scenes.parse_scenes(images), [meta for _, meta in prompts])
    return agreement, images


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 3) -> None:
    """Saves ``images`` (N, H, W, 3) uint8 as one PNG grid, each image enlarged ``scale`` times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, columns, padding=1, fill=128).repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(path, grid)


# ---------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m diffusion_env.shapes.pretrain``."""
    defaults = TrainConfig(output_dir=Path("outputs/pretrain"))
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_env.shapes.pretrain",
        description=(
            "Pretrain the built-in 32x32 text-to-image UNet from scratch on procedural scenes, "
            "resumably, and export its EMA weights; or evaluate a run's samples with the scene parser."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=defaults.output_dir,
                        help="run directory: checkpoints/, loss.png, config.json, evaluation files")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total optimisation steps of the run")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="scenes per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help="steps of linear learning-rate warm-up")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                        help="largest EMA decay (reached after the EMA warm-up)")
    parser.add_argument("--cfg-dropout", type=float, default=defaults.cfg_dropout,
                        help="probability of training on the empty prompt, for classifier-free guidance")
    parser.add_argument("--snr-gamma", type=float, default=defaults.snr_gamma,
                        help="min-SNR loss weighting gamma (0: uniform weighting)")
    parser.add_argument("--prediction-type", choices=builtin_model.PREDICTION_TYPES, default=defaults.prediction_type,
                        help="what the UNet predicts: the noise, v = sqrt(a) eps - sqrt(1 - a) x0, or the "
                        "rectified-flow velocity eps - x0 (flow: the shapes32-flow twin)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of weights, scenes and noise")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="steps between checkpoints")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--unet-config", type=Path, default=None,
                        help="JSON file of UNet2DConditionModel keyword arguments replacing the built-in ones")
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="where the EMA UNet is exported with save_pretrained at the end (default: the "
                        f"package's folder of the objective, {builtin_model.WEIGHTS_DIR.name}/ or "
                        f"{builtin_model.FLOW_WEIGHTS_DIR.name}/)")
    parser.add_argument("--no-export", action="store_true", help="do not export the EMA UNet at the end")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its latest checkpoint, bit for bit")
    parser.add_argument("--export-only", action="store_true",
                        help="export the EMA UNet of the latest checkpoint to --export-dir, without training")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate the latest checkpoint's EMA weights (or --weights) instead of training")
    parser.add_argument("--weights", type=Path, default=None,
                        help="with --evaluate: a save_pretrained directory to evaluate instead of a checkpoint")
    parser.add_argument("--eval-samples", type=int, default=96, help="with --evaluate: images per guidance scale")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[builtin_model.DEFAULT_GUIDANCE_SCALE],
                        help="with --evaluate: classifier-free guidance scales to evaluate")
    parser.add_argument("--eval-seed", type=int, default=0, help="with --evaluate: seed of prompts and noise")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that the parsed command line describes."""
    unet_config = builtin_model.unet_config()
    if args.unet_config is not None:
        unet_config = json.loads(args.unet_config.read_text())
    # Every field the command line has a flag of the same name for; the two below are derived.
    flagged = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if f.name not in ("export_dir", "unet_config") and hasattr(args, f.name)
    }
    export_dir = args.export_dir if args.export_dir is not None else builtin_model.weights_dir_of(args.prediction_type)
    return TrainConfig(**flagged, export_dir=None if args.no_export else export_dir, unet_config=unet_config)


def run_evaluation(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``--evaluate``: prints and stores agreement per guidance scale, and saves sample grids."""
    if args.weights is not None:
        denoiser = builtin_model.load_builtin_denoiser(args.weights)
        label = str(args.weights)
    else:
        config, state = load_checkpoint(args.output_dir)
        denoiser = PixelUNetDenoiser(
            ema_unet(state),
            builtin_model.make_scheduler(config.prediction_type),
            builtin_model.make_prompt_encoder(),
        )
        label = f"{latest_checkpoint(args.output_dir)} (EMA)"
    prompts = evaluation_prompts(args.eval_samples, seed=args.eval_seed)
    results: dict[str, dict[str, float]] = {}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for scale in args.guidance_scales:
        agreement, images = evaluate(denoiser, prompts, scale, seed=args.eval_seed)
        results[f"{scale:g}"] = agreement
        print(f"{label} guidance {scale:g}: " + ", ".join(f"{k} {v:.2f}" for k, v in agreement.items()))
        save_grid(images[:64], args.output_dir / f"samples_w{scale:g}.png")
    (args.output_dir / "evaluation.json").write_text(json.dumps({"weights": label, "results": results}, indent=2))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m diffusion_env.shapes.pretrain``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.evaluate:
        run_evaluation(args)
    elif args.export_only:
        config, state = load_checkpoint(args.output_dir)
        export_ema(state, config, args.export_dir)
        print(f"exported the EMA UNet of step {state.step} to {args.export_dir}")
    else:
        state = train(config_from_args(args), resume=args.resume, progress=not args.no_progress)
        print(f"trained to step {state.step}; loss curve: {args.output_dir / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
