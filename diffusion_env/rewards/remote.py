"""The client of a reward served by another process: ``reward="http://127.0.0.1:8000"``.

:class:`RemoteReward` is a reward function like any other (wrapped by
:class:`~diffusion_env.rewards.Reward`, which checks what it returns): it sends each batch in
one request in the :mod:`~diffusion_env.rewards.wire` format and returns the server's rewards and
details. It needs only the standard library; the server (:mod:`~diffusion_env.rewards.server`)
needs the ``serve`` extra.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffusion_env.rewards.registry import REWARD_URL_SCHEMES, RewardError
from diffusion_env.rewards.wire import decode_reply, encode_request
from diffusion_env.validation import check_float, check_int

#: Errors after which a request is sent again: the server may be restarting or overloaded.
_TRANSIENT = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


class RemoteRewardError(RewardError):
    """A reward server failed on a batch: unreachable, too slow, refused it, or answered garbage."""


def _checked_url(url: Any) -> str:
    """``url`` if it is ``http(s)://host[:port][/path]``, else a ValueError saying so."""
    valid = isinstance(url, str) and url.startswith(REWARD_URL_SCHEMES)
    if valid:
        parts = urllib.parse.urlsplit(url)
        try:
            valid = bool(parts.hostname) and not (parts.query or parts.fragment) and parts.port != 0
        except ValueError:  # urlsplit reads the port lazily: not a number, or out of range
            valid = False
    if not valid:
        raise ValueError(
            f"reward server URL {url!r} is not of the form 'http://host:port'; allowed: http(s)://host[:port][/path]"
        )
    return url


def _prompt_preview(prompts: Sequence[str], shown: int = 2, width: int = 40) -> str:
    quoted = [repr(p if len(p) <= width else p[: width - 3] + "...") for p in prompts[:shown]]
    return ", ".join(quoted) + (f" and {len(prompts) - shown} more" if len(prompts) > shown else "")


class RemoteReward:
    """Scores batches on the reward server at ``url``, one request per batch.

    Args:
        url: the server's base URL, ``http://host:port`` (its endpoints are ``/reward`` and
            ``/health`` below it).
        timeout: seconds to wait for the connection and for each read of the reply (> 0).
        retries: how often a request is sent again after a timeout, a connection error or a 5xx
            status (>= 0); a 4xx status or an unreadable reply is not retried.
        backoff: seconds before the first retry, doubled before each next one (>= 0).

    Raises:
        ValueError: for a URL that is not ``http(s)://host[:port]``, or out-of-range numbers.
        TypeError: for numbers of the wrong type.
    """

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5) -> None:
        self.url = _checked_url(url).rstrip("/")
        self.timeout = check_float("timeout", timeout, 0.0, exclusive_minimum=True)
        self.retries = check_int("retries", retries, 0)
        self.backoff = check_float("backoff", backoff, 0.0)
        self.__name__ = self.url
        # Direct connections: a reward server sits next to the trainer, never behind the proxy an
        # environment may configure for the internet (which would also see every image).
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, timeout={self.timeout:g}, retries={self.retries})"

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` reply (which reward it serves, on which device); one try.

        Raises:
            RemoteRewardError: if the server does not answer it with a JSON object.
        """
        try:
            with self._opener.open(f"{self.url}/health", timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except (*_TRANSIENT, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RemoteRewardError(f"reward server {self.url} did not answer /health: {_describe(error)}") from error
        if not isinstance(reply, dict):
            raise RemoteRewardError(f"reward server {self.url} answered /health with {reply!r}; allowed: a JSON object")
        return reply

    def wait_until_ready(self, seconds: float = 30.0) -> dict[str, Any]:
        """Polls ``/health`` until the server answers (e.g. after starting it); returns the reply.

        Raises:
            RemoteRewardError: if it has not answered within ``seconds``.
        """
        deadline = time.monotonic() + check_float("seconds", seconds, 0.0)
        while True:
            try:
                return self.health()
            except RemoteRewardError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The server's rewards ``(B,)`` and details for one batch.

        Raises:
            RemoteRewardError: naming the URL, the batch size and its first prompts, if the batch
                cannot be encoded, the server stays unreachable or too slow through the retries,
                refuses the batch (4xx) or answers something other than B finite rewards.
        """
        batch = images.shape[0]
        where = f"reward server {self.url}"
        on_batch = f"(batch of {batch} images, prompts {_prompt_preview(prompts)})"
        try:
            body = encode_request(images, prompts, metadata)
        except ValueError as error:
            raise RemoteRewardError(f"cannot send the batch to {where}: {error} {on_batch}") from error
        reply = self._post(body, where, on_batch)
        try:
            return decode_reply(reply, batch)
        except ValueError as error:
            raise RemoteRewardError(f"{where} answered garbage: {error} {on_batch}") from error

    def _post(self, body: bytes, where: str, on_batch: str) -> bytes:
        """The reply body of ``POST /reward``, after at most ``retries`` retries."""
        request = urllib.request.Request(
            f"{self.url}/reward", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as error:
                detail = _error_detail(error)
                if error.code < 500:
                    raise RemoteRewardError(f"{where} refused the batch with HTTP {error.code}: {detail} {on_batch}") from error
                last = f"HTTP {error.code}: {detail}"
            except _TRANSIENT as error:
                last = _describe(error)
        raise RemoteRewardError(
            f"{where} failed {attempts} times (timeout {self.timeout:g} s each); last: {last} {on_batch}"
        )


def _describe(error: BaseException) -> str:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def _error_detail(error: urllib.error.HTTPError) -> str:
    """The ``detail`` of an error reply (the format's), or the start of its body."""
    try:
        with error:
            text = error.read().decode("utf-8", errors="replace")
    except _TRANSIENT:
        return "(the reply's body could not be read)"
    try:
        detail = json.loads(text).get("detail", text)
    except (json.JSONDecodeError, AttributeError):
        detail = text
    return str(detail)[:300]
