"""The wire format of rewards served over HTTP (version 1): plain JSON, so a server can be written in any language.

A server answers two requests (``BASE`` is the URL given as ``reward=``, e.g. ``http://127.0.0.1:8000``):

``GET BASE/health`` replies ``{"reward": "<name>", "device": "<device>", "wire_format": 1}``.

``POST BASE/reward`` (``Content-Type: application/json``) scores one batch of B images::

    {"images": {"shape": [B, H, W, 3], "dtype": "uint8", "data": "<base64>"},
     "prompts": ["a red circle", ...],      # B strings
     "metadata": [{"shape": "circle"}, ...]} # B JSON objects

``data`` is the standard base64 (RFC 4648, padded) of the B*H*W*3 pixel bytes in C order
(row-major: image, row, column, RGB channel). The reply, status 200::

    {"rewards": [-3.25, ...],                 # B finite numbers
     "details": {"jpeg_kb": [3.25, ...]}}     # optional: per-sample numbers, null where undefined

A request the server cannot read is answered with status 400 and a reward that fails on the batch
with 422, both as ``{"detail": "<what is wrong>"}``; the client does not retry those (the same
batch would fail again), but retries status 5xx, timeouts and connection errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: The version :func:`encode_request` writes and the ``/health`` reply names.
WIRE_FORMAT = 1

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in metadata, as the JSON numbers and lists they hold."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def encode_request(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> bytes:
    """The request body scoring uint8 ``images`` ``(B, H, W, 3)`` with their prompts and metadata.

    Raises:
        ValueError: for images that are not uint8 ``(B, H, W, 3)``, or metadata that JSON cannot
            hold (allowed: strings, finite numbers, booleans, None, lists and dicts of them).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images are {images.dtype} of shape {tuple(images.shape)}; allowed: uint8 (B, H, W, 3)")
    pixels = np.ascontiguousarray(images.detach().cpu().numpy())
    payload = {
        "images": {"shape": list(pixels.shape), "dtype": "uint8", "data": base64.b64encode(pixels.tobytes()).decode("ascii")},
        "prompts": list(prompts),
        "metadata": [dict(entry) for entry in metadata],
    }
    try:
        return json.dumps(payload, default=_json_default, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"metadata cannot be sent as JSON ({error}); allowed: strings, finite numbers, booleans, None, "
            "and lists and dicts of them"
        ) from error


def _load_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the {what} is not JSON ({error}): {body[:80]!r}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"the {what} is a JSON {type(payload).__name__}; allowed: a JSON object")
    return payload


def decode_request(body: bytes) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """The images ``(B, H, W, 3)`` uint8, prompts and metadata of a request body (the server's half).

    Raises:
        ValueError: naming the field that does not follow the format and what is allowed.
    """
    payload = _load_object(body, "request")
    images, prompts, metadata = payload.get("images"), payload.get("prompts"), payload.get("metadata")
    if not isinstance(images, dict) or images.get("dtype") != "uint8":
        raise ValueError('"images" must be an object {"shape": [B, H, W, 3], "dtype": "uint8", "data": "<base64>"}')
    shape = images.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in shape)
        or shape[3] != 3
    ):
        raise ValueError(f'"images.shape" is {shape!r}; allowed: [B, H, W, 3] of positive integers')
    try:
        raw = base64.b64decode(images.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError) as error:
        raise ValueError(f'"images.data" is not standard base64: {error}') from None
    if len(raw) != math.prod(shape):
        raise ValueError(f'"images.data" holds {len(raw)} bytes; allowed: {math.prod(shape)} for shape {shape}')
    batch = shape[0]
    if not isinstance(prompts, list) or len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f'"prompts" must be a list of {batch} strings, one per image')
    if not isinstance(metadata, list) or len(metadata) != batch or not all(isinstance(m, dict) for m in metadata):
        raise ValueError(f'"metadata" must be a list of {batch} objects, one per image')
    # A bytearray, so that the array is writable (torch refuses to wrap read-only memory silently).
    pixels = np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(shape)
    return pixels, prompts, metadata


def encode_reply(rewards: torch.Tensor, details: Mapping[str, np.ndarray]) -> bytes:
    """The reply body of B rewards and per-sample numeric details (non-finite details sent as null).

    Raises:
        ValueError: for a detail that is not numeric.
    """
    encoded = {}
    for key, values in details.items():
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"detail {key!r} is not numeric; allowed over HTTP: one number per sample") from None
        if array.ndim != 1:
            raise ValueError(f"detail {key!r} has shape {array.shape}; allowed over HTTP: one number per sample")
        # JSON has no NaN or infinity; null is the format's "undefined for this sample".
        as_objects = array.astype(object)
        as_objects[~np.isfinite(array)] = None
        encoded[key] = as_objects.tolist()
    return json.dumps({"rewards": rewards.detach().cpu().tolist(), "details": encoded}, allow_nan=False).encode("utf-8")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_float32(value: Any) -> bool:
    """Whether ``value`` is a number that float32 holds as a finite value (False for NaN, infinities,
    and numbers that would overflow)."""
    return _is_number(value) and abs(value) <= _FLOAT32_MAX


def decode_reply(body: bytes, batch: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The rewards ``(B,)`` and details (NaN where null), float32 as the figures of the built-in rewards,
    of a reply (the client's half).

    Raises:
        ValueError: for a reply that is not JSON, or not B finite rewards, or details not of length B.
    """
    payload = _load_object(body, "reply")
    rewards = payload.get("rewards")
    if not isinstance(rewards, list) or not all(_is_number(value) for value in rewards):
        raise ValueError(f'"rewards" is {str(rewards)[:80]}; allowed: a list of {batch} numbers')
    if len(rewards) != batch:
        raise ValueError(f'"rewards" holds {len(rewards)} numbers for {batch} images; allowed: one per image')
    if not all(_is_float32(value) for value in rewards):
        raise ValueError(f'"rewards" are {rewards}, not all finite float32 numbers; allowed: finite numbers')
    details = payload.get("details", {})
    if not isinstance(details, dict):
        raise ValueError(f'"details" is a JSON {type(details).__name__}; allowed: an object of per-sample lists')
    decoded = {}
    for key, values in details.items():
        if not isinstance(values, list) or len(values) != batch or not all(v is None or _is_float32(v) for v in values):
            raise ValueError(f'detail {key!r} is {str(values)[:80]}; allowed: a list of {batch} finite numbers or nulls')
        decoded[key] = np.asarray([math.nan if value is None else value for value in values], dtype=np.float32)
    return np.asarray(rewards, dtype=np.float32), decoded
