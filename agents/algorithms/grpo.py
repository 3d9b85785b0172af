"""GRPO for diffusion sampling: group-relative advantages, a clipped ratio and a KL to the pretrained policy.

Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath", Sec. 4.1) drops the value
function of PPO: each prompt is sampled G times (a group), and a sample's advantage is its reward
relative to the others of its group,

    A_i = (r_i - mean(r_group)) / std(r_group)        (or / std of the whole batch),

trained with PPO's clipped importance ratio and a KL penalty beta KL(pi_theta || pi_ref) to the
pretrained policy. Flow-GRPO (Liu et al., 2025) and DanceGRPO (Xue et al., 2025) carry it over to
diffusion and flow sampling, where every step is a Gaussian policy: the ratio is that of the
step's likelihoods (per-dimension as in DDPO's code, or exact), and the KL between two
Gaussians of the same sigma_t has the closed form ||mu_theta - mu_ref||^2 / (2 sigma_t^2)
(``sampler.kl_divergence``, whatever the sampler: DDIM, DDPM or a flow sampler).

Options, each from the paper that proposed it:

- ``advantage_scale``: the group's std (GRPO) or the batch's (without the group-std bias that
  Liu et al., 2025, "Understanding R1-Zero-Like Training", point out);
- ``skip_zero_spread``: groups whose rewards are all equal carry no relative signal and are left
  out of the update (DAPO's dynamic sampling, Yu et al., 2025);
- ``timestep_fraction``: a random fraction of the trained steps per sample and pass (DDPO's and
  Flow-GRPO's timestep subsampling);
- ``window_size``, ``window_stride``, ``window_shift_every``: a window of trained steps that slides
  from the first (noisiest) steps towards the last over the epochs (MixGRPO, Li et al., 2025);
  ``min_sigma``/``max_sigma`` first restrict the steps to a sigma window
  (:class:`agents.step_window.StepWindow`);
- ``inner_epochs`` passes over the batch, with early stop once an optimiser step's mean
  ``approx_kl`` exceeds ``target_kl`` (PPO's early stopping, Schulman et al., 2017, as in
  common implementations).

Collection options live in the ``[env]`` table, since any algorithm can use them:
``shared_noise`` gives the samples of a group one x_T (DanceGRPO), and ``branch_step`` k makes
them share their trajectory up to step k (TempFlow-GRPO, He et al., 2025; BranchGRPO, Li et al.,
2025): the trajectories record k, and only the steps from k on are trained, so that the reward
differences within a group are credited to the steps after the branch.

Registered as the algorithm ``"grpo"``, with its own advantages (the training command's
``[advantages]`` statistics are not used; its ``clip`` is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from agents.advantages import group_relative_advantages, groups_with_spread
from agents.algorithms.base import UpdateContext, has_kl_penalty, mean_figures, policy_gradient_pass
from agents.algorithms.registry import register_algorithm
from agents.losses import importance_sampled_loss
from agents.rollouts import Outcomes, Trajectories
from agents.step_window import StepWindow
from diffusion_env.validation import check_float, check_int


@dataclass
class GRPOConfig:
    """Hyper-parameters of a GRPO update (defaults: plain GRPO, one pass, every stochastic step)."""

    advantage_scale: Literal["group", "batch"] = field(
        default="group", metadata={"help": "divide the reward minus its group's mean by the group's std (GRPO) or the batch's"}
    )
    skip_zero_spread: bool = field(
        default=True, metadata={"help": "leave out the groups whose rewards are all equal (DAPO's dynamic sampling)"}
    )
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip epsilon of the ratio"})
    per_dimension_ratio: bool = field(
        default=True, metadata={"help": "clip the per-dimension-normalised ratio (DDPO's code, Flow-GRPO), else the exact one"}
    )
    kl_coefficient: float = field(default=0.0, metadata={"help": "beta: weight of the exact KL to the pretrained policy; 0: none"})
    inner_epochs: int = field(default=1, metadata={"help": "passes over each epoch's samples"})
    target_kl: float = field(
        default=math.inf, metadata={"help": "stop the passes after an optimiser step whose mean approx_kl exceeds this; inf: never"}
    )
    minibatch_size: int = field(default=32, metadata={"help": "(sample, timestep) pairs per network call"})
    gradient_accumulation: int = field(default=1, metadata={"help": "minibatches per optimiser step"})
    timestep_fraction: float = field(default=1.0, metadata={"help": "fraction of the trained steps drawn at random per sample and pass"})
    min_sigma: float = field(default=0.0, metadata={"help": "steps with sigma_t below this are not trained on"})
    max_sigma: float = field(default=math.inf, metadata={"help": "steps with sigma_t above this are not trained on"})
    window_size: int = field(
        default=0, metadata={"help": "GRPO: train a window of this many of the steps, sliding over epochs (MixGRPO); 0: all"}
    )
    window_stride: int = field(default=1, metadata={"help": "GRPO: steps the window moves by at each shift"})
    window_shift_every: int = field(default=1, metadata={"help": "GRPO: epochs between two shifts of the window"})

    def __post_init__(self) -> None:
        if self.advantage_scale not in ("group", "batch"):
            raise ValueError(f"advantage_scale={self.advantage_scale!r}; allowed: 'group' or 'batch'")
        check_float("clip_range", self.clip_range, 0.0, exclusive_minimum=True)
        check_float("kl_coefficient", self.kl_coefficient, 0.0)
        check_float("target_kl", self.target_kl, 0.0, exclusive_minimum=True, allow_infinity=True)  # inf: no early stop
        check_float("timestep_fraction", self.timestep_fraction, 0.0, 1.0, exclusive_minimum=True)
        StepWindow(self.min_sigma, self.max_sigma)  # refuses an empty or inverted window
        for name in ("inner_epochs", "minibatch_size", "gradient_accumulation", "window_stride", "window_shift_every"):
            check_int(name, getattr(self, name), 1)
        check_int("window_size", self.window_size, 0)  # 0: every step

    @property
    def window(self) -> StepWindow:
        """The sigma window of the steps trained on."""
        return StepWindow(self.min_sigma, self.max_sigma)

    def sliding_window(self, steps: torch.Tensor, epoch: int) -> torch.Tensor:
        """The ``window_size`` consecutive ones of ``steps`` trained at ``epoch`` (all of them if 0 or more).

        The window starts at the first step and moves ``window_stride`` steps every
        ``window_shift_every`` epochs, from the noisiest steps towards the last; after the last
        position it starts again at the first (MixGRPO's sliding window, Li et al., 2025).
        """
        if self.window_size == 0 or self.window_size >= len(steps):
            return steps
        positions = len(steps) - self.window_size + 1
        start = (epoch // self.window_shift_every * self.window_stride) % positions
        return steps[start : start + self.window_size]


def advantages(samples: Outcomes, config: GRPOConfig) -> torch.Tensor:
    """The registered advantages: :func:`~agents.advantages.group_relative_advantages` over the samples' groups.

    Raises:
        ValueError: if every group holds one sample (nothing to compare a reward with).
    """
    if len(torch.unique(samples.groups)) == samples.batch_size:
        raise ValueError(
            "GRPO compares the rewards of the samples of one prompt, and every group holds one sample; "
            "allowed: [env] samples_per_prompt >= 2"
        )
    return group_relative_advantages(samples.rewards, samples.groups, config.advantage_scale)


def grpo_update(context: UpdateContext, trajectories: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
    """The registered update: trains ``context.policy`` on one batch; returns the mean of each logged figure.

    The steps trained are the trajectories' :meth:`~agents.rollouts.Trajectories.trained_steps`
    (the sigma window, from the branch step on) cut to the sliding window of ``context.epoch``;
    each sample draws its own ``timestep_fraction`` of them per pass. Besides the objective's
    figures (``losses/...``) it logs ``trained_fraction`` (the samples whose group has a reward
    spread, or all) and ``passes`` (those made before an early stop).

    Raises:
        NonFiniteError: if a loss or gradient is NaN or inf (nothing is applied then).
        ValueError: if a KL coefficient is set without a reference policy, or no step is left to train.
    """
    config: GRPOConfig = context.config
    policy = context.policy
    steps = config.sliding_window(trajectories.trained_steps(config.window, policy.sampler), context.epoch)
    processes = context.processes
    if config.skip_zero_spread:
        samples = torch.nonzero(groups_with_spread(trajectories.rewards, trajectories.groups).cpu()).flatten()
    else:
        samples = torch.arange(trajectories.batch_size)
    trained_fraction = len(samples) / trajectories.batch_size
    if processes.max(len(samples)) == 0:
        return {"losses/trained_fraction": 0.0, "losses/passes": 0.0, "losses/grad_norm": 0.0}
    if len(samples) == 0:
        # Another process trains: this one takes the same optimiser steps on its samples, whose
        # advantages are all 0 (only a KL penalty acts on them).
        samples = torch.arange(trajectories.batch_size)

    def objective(
        log_probs: torch.Tensor, batch: torch.Tensor, batch_steps: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        old_log_probs = trajectories.log_probs[batch, batch_steps]
        return importance_sampled_loss(
            log_probs, old_log_probs, advantages[batch], actions, config.clip_range, config.per_dimension_ratio
        )

    num_train_steps = max(1, round(config.timestep_fraction * len(steps)))
    figures: dict[str, list[float]] = {}
    passes = 0
    policy.train()
    for _ in range(config.inner_epochs):
        passes += 1
        # Each sample its own random subset of the steps.
        order = torch.argsort(torch.rand(len(samples), len(steps), generator=context.generator), dim=1)[:, :num_train_steps]
        minibatches = list(trajectories.minibatches(config.minibatch_size, context.generator, steps[order], samples))
        stopped = policy_gradient_pass(
            policy, context.optimizer, trajectories, minibatches, objective, figures, name="GRPO",
            accumulation=config.gradient_accumulation, max_grad_norm=context.max_grad_norm,
            kl_coefficient=config.kl_coefficient, reference=context.reference, target_kl=config.target_kl,
            processes=processes,
        )
        if stopped:
            break
    policy.eval()
    return {
        **mean_figures(figures),
        "losses/trained_fraction": trained_fraction,
        "losses/passes": float(passes),
    }


register_algorithm(
    "grpo", GRPOConfig, grpo_update, uses_reference=has_kl_penalty, advantages=advantages,
    description="GRPO: group-relative advantages, clipped ratio, KL to the pretrained policy (Shao et al., 2024; Flow-GRPO)",
)
