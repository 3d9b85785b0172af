"""The processes of a training run: one, or several launched by accelerate (data parallel).

    accelerate launch --multi_gpu --num_processes 2 -m agents.train --config FILE --output-dir DIR

A run of N processes (ranks) trains one model on N times the batch of ``[env]``:

- each rank collects its own trajectories, with its own seeds (:meth:`Processes.seed`: the run's
  seed on rank 0, seeds spawned from it on the others), so ranks draw different prompts and noise;
  a group of samples of one prompt (and its shared initial noise) lives on one rank;
- the outcomes (rewards, groups, prompts) of all ranks are gathered before advantages are
  computed, so per-prompt and per-group statistics are those of the whole batch, and every rank
  computes the same advantages and keeps its own share;
- the trained network runs forward through the module accelerate wraps (DistributedDataParallel),
  which averages the gradients across ranks in the backward pass; every rank takes the
  same number of optimiser steps (:func:`agents.algorithms.base.policy_gradient_pass` pads a rank
  with fewer minibatches with zero-weighted ones, and early stops on the approx-KL of all ranks);
- rank 0 alone writes logs, image grids and checkpoints; a checkpoint holds every rank's random
  states, so a run resumes on the same number of processes exactly where it stopped.

Mixed precision is accelerate's (``--mixed_precision bf16``: the wrapped network runs under
autocast; the trained parameters stay float32). Launches that shard the parameters (FSDP,
DeepSpeed) are refused for now. A rank that dies makes the others fail at their next collective;
one that hangs, after :data:`DEFAULT_TIMEOUT`.

The base class :class:`Processes` is the single-process run, where every collective is the identity.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.rollouts import Outcomes

#: How long a rank waits in a collective (for a rank that died or hangs) before it fails.
DEFAULT_TIMEOUT = timedelta(minutes=30)


class Processes:
    """A run of one process: the rank is 0, and every collective returns its input."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this process trains on: ``requested`` (the run's ``[run] device``)."""
        return requested

    def seed(self, seed: int) -> int:
        """This rank's seed from the run's: the run's own on rank 0, so that a one-process run is
        unchanged; on rank r > 0 the first word of ``numpy.random.SeedSequence(seed, spawn_key=(r,))``."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence(seed, spawn_key=(self.rank,)).generate_state(1)[0])

    def prepare(self, network: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The network to run forward in training, and the optimiser to step: both as given."""
        return network, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def synchronizing(self, network: nn.Module, sync: bool) -> contextlib.AbstractContextManager[object]:
        """The context of a forward and backward pass through the wrapped ``network``: with ``sync``
        False (a minibatch whose gradient is accumulated, not yet stepped on) the ranks skip
        averaging it, which the next synchronised pass does for the sum."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Sequence[torch.Tensor], max_norm: float) -> float:
        """Clips the gradients' total norm to ``max_norm``; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks."""
        return values

    def max(self, value: int) -> int:
        """The largest ``value`` of the ranks."""
        return value

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` (of one shape on all ranks) concatenated along dimension 0, in rank order."""
        return values

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items`` (picklable) concatenated, in rank order."""
        return list(items)

    def wait(self) -> None:
        """Returns when every rank has reached this point."""

    # ------------------------------------------------------------------ built on the collectives

    def gather_outcomes(self, outcomes: Outcomes) -> Outcomes:
        """Every rank's outcomes in rank order; the groups of rank r are renumbered by r times the
        batch size (groups never span ranks, and every rank has the same batch size)."""
        if self.world_size == 1:
            return outcomes
        groups = outcomes.groups + self.rank * outcomes.batch_size
        return Outcomes(
            rewards=self.gather(outcomes.rewards.float()),
            groups=self.gather(groups),
            prompts=self.gather_objects(list(outcomes.prompts)),
            metadata=self.gather_objects(list(outcomes.metadata)),
        )

    def own_share(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a gathered tensor (rank r holds the r-th of ``world_size`` equal blocks)."""
        size = values.shape[0] // self.world_size
        return values[self.rank * size : (self.rank + 1) * size]

    def mean_figures(self, figures: Mapping[str, float]) -> dict[str, float]:
        """Each figure's mean over the ranks that logged it (a monitored detail may be defined on some only)."""
        if self.world_size == 1:
            return dict(figures)
        logged: dict[str, list[float]] = {}
        for rank_figures in self.gather_objects([dict(figures)]):
            for key, value in rank_figures.items():
                logged.setdefault(key, []).append(value)
        return {key: float(np.mean(values)) for key, values in logged.items()}


class AcceleratedProcesses(Processes):
    """The processes of a run launched by ``accelerate launch`` (or ``torchrun``), through an ``Accelerator``.

    Args:
        device: the run's ``[run] device``: ``"cpu"`` runs every rank on the CPU (gloo); otherwise each
            rank takes the accelerator accelerate assigns it (``cuda:LOCAL_RANK``).
        timeout: how long a collective waits for the other ranks before it fails (a rank that died
            makes the others fail at their next collective instead of hanging).
    """

    def __init__(self, device: str, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, InitProcessGroupKwargs

        self.accelerator = Accelerator(
            cpu=torch.device(device).type == "cpu", kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)]
        )
        sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        if self.accelerator.distributed_type in sharded:
            # Sharded parameters exist whole only inside the wrapped module's forward, and sampling
            # and the adapters-off reference run the network outside it.
            raise ValueError(
                f"accelerate's {self.accelerator.distributed_type.value} shards the parameters, which the training "
                "command does not support yet; allowed: data-parallel launches (--multi_gpu, or one process per CPU)"
            )
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes

    def device(self, requested: str) -> str:
        return str(self.accelerator.device)

    def prepare(self, network: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The network wrapped by accelerate (DistributedDataParallel, with the mixed precision its
        config names), which averages gradients across ranks, and the optimiser wrapped with it."""
        return self.accelerator.prepare(network, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def synchronizing(self, network: nn.Module, sync: bool) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(network)

    def clip_grad_norm(self, parameters: Sequence[torch.Tensor], max_norm: float) -> float:
        # accelerate unscales float16 mixed-precision gradients before taking their norm.
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        # Collectives run on the rank's device (NCCL takes no CPU tensor); the result goes back.
        return self.accelerator.reduce(values.to(self.accelerator.device, copy=True), reduction="sum").to(values.device)

    def max(self, value: int) -> int:
        values = self.gather(torch.tensor([value], device=self.accelerator.device))
        return int(values.max())

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(values.to(self.accelerator.device).contiguous()).to(values.device)

    def gather_objects(self, items: list[Any]) -> list[Any]:
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


def launched_world_size(environ: Mapping[str, str] = os.environ) -> int:
    """The number of processes a launcher (``accelerate launch``, ``torchrun``) started: its ``WORLD_SIZE``, else 1."""
    return int(environ.get("WORLD_SIZE", "1"))


def launched_processes(device: str) -> Processes:
    """The processes of this run: :class:`AcceleratedProcesses` when a launcher started several, else one."""
    return AcceleratedProcesses(device) if launched_world_size() > 1 else Processes()

