"""Reading a finished (or running) training run back: its config, history, checkpoint and policy.

    run = load_run("runs/compressibility")           # the latest checkpoint
    early = load_run("runs/compressibility", epoch=20)
    policy = run.build_run({"env": {"num_envs": 16}}).policy

Benchmarks and notebooks read runs through :func:`load_run` only; the layout of a run's folder
(checkpoints, the ``latest`` pointer, ``config.json``, ``state.pt``) is :mod:`agents.train`'s and
:mod:`diffusion_env.checkpoints`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.config import TrainConfig
from agents.policy import GaussianDenoisingPolicy
from agents.train import Run, find_run_checkpoint, saved_config
from diffusion_env import checkpoints


@dataclass(frozen=True)
class LoadedRun:
    """One checkpoint of a training run.

    Attributes:
        directory: the run's output folder.
        config: the config the run was trained with.
        history: the per-epoch figures up to the checkpoint (``charts/...``, ``losses/...``).
        checkpoint: the checkpoint's folder.
        epoch: the epochs trained up to the checkpoint.
    """

    directory: Path
    config: TrainConfig
    history: list[dict[str, float]]
    checkpoint: Path
    epoch: int

    def build_run(self, changes: Mapping[str, Mapping[str, Any]] | None = None, *, reference: bool = False) -> Run:
        """The :class:`~agents.train.Run` restored at this checkpoint, its config changed by ``changes``.

        ``changes`` replaces table entries, e.g. ``{"env": {"prompts": "scenes_heldout", "num_envs": 16}}``
        to sample the trained policy on other prompts; the trained weights must fit (same model and
        ``lora_rank``). Without ``reference`` no KL reference policy is built (none is needed to sample).
        """
        run = Run(self.config.with_changes(changes or {}), reference=reference)
        run.load(self.directory, self.epoch)
        return run

    def policy(self, changes: Mapping[str, Mapping[str, Any]] | None = None) -> GaussianDenoisingPolicy:
        """The trained policy at this checkpoint (see :meth:`build_run`)."""
        return self.build_run(changes).policy


def load_run(run_dir: str | Path, epoch: int | None = None) -> LoadedRun:
    """The run in ``run_dir`` at its latest checkpoint, or at the checkpoint of ``epoch``.

    Raises:
        FileNotFoundError: if there is no such checkpoint.
        ValueError: if the saved config cannot be read back (e.g. a model no longer registered).
    """
    directory = Path(run_dir)
    checkpoint = find_run_checkpoint(directory, epoch)
    state = checkpoints.read_state(checkpoint)
    return LoadedRun(directory, saved_config(directory, epoch), list(state["history"]), checkpoint, int(state["epoch"]))


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a training run with at least one checkpoint."""
    return checkpoints.latest_name(Path(run_dir)) is not None
