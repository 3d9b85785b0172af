"""Checks of user-given numbers and devices, with one wording for every argument of the project.

Integers of any integral type (``int``, ``np.int64``, a 0-d integer tensor) are accepted as
integers; ``bool`` and strings are refused everywhere, even where Python would convert them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[Exception] = ValueError,
) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; ``TypeError`` for a non-integer, ``error`` out of range."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f"{minimum} <= "
        high = "" if maximum is None else f" <= {maximum}"
        raise error(f"{name}={value} is out of range; allowed: an integer {low}{name}{high}")
    return value


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclusive_minimum: bool = False,
    allow_infinity: bool = False,
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a finite ``float`` in the given range (``minimum`` excluded with ``exclusive_minimum``)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_infinity):
        raise error(f"{name}={value} is not a finite number; allowed: a finite number")
    below = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    above = maximum is not None and value > maximum
    if below or above:
        low = "" if minimum is None else f"{minimum:g} {'<' if exclusive_minimum else '<='} "
        high = "" if maximum is None else f" <= {maximum:g}"
        raise error(f"{name}={value:g} is out of range; allowed: {low}{name}{high}")
    return value


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or a ``ValueError`` saying what does."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; allowed: {available_devices()}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: no CUDA device is available on this machine; allowed: {available_devices()}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} does not exist; allowed: {available_devices()}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r}: MPS is not available on this machine; allowed: {available_devices()}")
    return device


def available_devices() -> list[str]:
    """The torch devices this process can use, e.g. ``['cpu', 'cuda:0']``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices
