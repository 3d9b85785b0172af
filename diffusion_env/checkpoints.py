"""Atomic, resumable checkpoints of a training run: one folder per checkpoint and a ``latest`` pointer.

A checkpoint is a folder ``root/NAME`` holding

- weights as safetensors files (``STEM.safetensors``, one per group of tensors),
- everything else (optimiser state, random-number-generator states, histories) in ``state.pt``,
  written with ``torch.save`` and read back with ``torch.load(weights_only=True)``, so that it
  may hold only tensors and plain Python values (dicts, lists, numbers, strings),
- and text files (e.g. ``config.json``).

Everything is written into a temporary folder ``root/.partial-NAME`` first and renamed into
place with ``os.replace``; then the ``latest`` file, which names the current checkpoint, is
replaced atomically as well. A process killed at any moment leaves the previous checkpoint and
its pointer intact. Older checkpoints can be pruned to the last ``keep_last``.

Both the fine-tuning command (``agents.train``) and the built-in model's pretraining
(``diffusion_env.shapes.pretrain``) checkpoint through this module.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

#: The file in a run's checkpoint root that names its current checkpoint.
LATEST: str = "latest"
#: The file of a checkpoint that holds its non-weight state.
STATE_FILE: str = "state.pt"
#: Prefix of the temporary folder a checkpoint is written into.
PARTIAL_PREFIX: str = ".partial-"


def write_checkpoint(
    root: Path,
    name: str,
    *,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any] | None = None,
    texts: Mapping[str, str] | None = None,
    keep_last: int = 0,
) -> Path:
    """Writes the checkpoint ``root/name`` atomically and makes it the one ``latest`` names.

    Args:
        root: the folder of a run's checkpoints (created if missing).
        name: the checkpoint's folder name; names must sort in the order they are written
            (e.g. ``checkpoint-0012``, ``step-0000250``), which is what pruning relies on.
        weights: file stem -> tensors, each saved as ``stem.safetensors``.
        state: saved as ``state.pt``; only tensors and plain Python values (what
            ``torch.load(weights_only=True)`` reads back).
        texts: file name -> text content.
        keep_last: after writing, only the last ``keep_last`` checkpoints sharing ``name``'s
            prefix (up to its last ``-``) are kept; 0 keeps all.

    Returns:
        The checkpoint's folder.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last={keep_last}; allowed: an int >= 0 (0 keeps every checkpoint)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    partial = root / f"{PARTIAL_PREFIX}{name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        for stem, tensors in weights.items():
            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, partial / f"{stem}.safetensors")
        if state is not None:
            torch.save(dict(state), partial / STATE_FILE)
        for file_name, text in (texts or {}).items():
            (partial / file_name).write_text(text)
        # A folder of this name is a leftover of a run killed between this rename and the
        # pointer's, or of a run resumed from an earlier checkpoint: its step is written anew.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _write_pointer(root, name)
    if keep_last:
        prune(root, name.rpartition("-")[0] + "-", keep_last)
    return final


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Calls ``write(temporary_path)`` beside ``path`` and renames the result over ``path`` in one step."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_pointer(root: Path, name: str) -> None:
    """Replaces ``root/latest`` atomically with ``name``."""
    atomic_write(root / LATEST, lambda path: path.write_text(name + "\n"))


def latest_name(root: Path) -> str | None:
    """The name ``root/latest`` holds, or None before the first checkpoint."""
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def find_checkpoint(root: Path, name: str | None = None) -> Path:
    """The checkpoint folder ``root/name``, by default the one ``latest`` names.

    Raises:
        FileNotFoundError: if there is no such complete checkpoint (the message names the folder).
    """
    root = Path(root)
    name = latest_name(root) if name is None else name
    if name is None:
        raise FileNotFoundError(f"no checkpoint in {root} (no {LATEST!r} file)")
    checkpoint = root / name
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"no checkpoint {checkpoint}")
    return checkpoint


def checkpoint_names(root: Path, prefix: str) -> list[str]:
    """The complete checkpoints in ``root`` whose names start with ``prefix``, oldest first."""
    root = Path(root)
    return sorted(path.name for path in root.glob(f"{prefix}*") if path.is_dir()) if root.is_dir() else []


def prune(root: Path, prefix: str, keep_last: int) -> None:
    """Deletes all but the last ``keep_last`` checkpoints named ``prefix...`` (never the current one)."""
    current = latest_name(root)
    for name in checkpoint_names(root, prefix)[:-keep_last]:
        if name != current:
            shutil.rmtree(Path(root) / name)


def read_weights(checkpoint: Path, stem: str) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint/stem.safetensors`` (on the CPU)."""
    return load_file(Path(checkpoint) / f"{stem}.safetensors")


def read_state(checkpoint: Path) -> dict[str, Any]:
    """``checkpoint/state.pt``, read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: if the checkpoint has no state file.
    """
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {Path(checkpoint)} (it holds no {STATE_FILE})")
    return torch.load(path, weights_only=True)
