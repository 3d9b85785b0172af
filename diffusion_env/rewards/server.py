"""A reward served over HTTP to other processes (FastAPI and uvicorn, the ``serve`` extra).

    python -m diffusion_env.rewards.server --reward aesthetic [--host 127.0.0.1] [--port 8000] [--device cpu]

Serves any reward :func:`~diffusion_env.rewards.make_reward` resolves (a registered name or a
weighted combination) in the :mod:`~diffusion_env.rewards.wire` format; environments use it with
``reward="http://127.0.0.1:8000"``. The reward is built once at start-up, so a model loads once
however many training processes share it. Binds to the loopback interface by default: the server
has no authentication, and anyone who can reach it can make it score images.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at run time,
# and fastapi is imported inside create_app (so that the package does not need it).

import argparse
import ipaddress
import json
import sys
import threading
from typing import Any

import torch

from diffusion_env.rewards.registry import REWARD_URL_SCHEMES, Reward, RewardError, make_reward
from diffusion_env.rewards.wire import WIRE_FORMAT, decode_request, encode_reply
from diffusion_env.validation import check_device, check_int


def create_app(reward: Reward, device: torch.device) -> Any:
    """The FastAPI application serving ``reward`` on images placed on ``device``.

    ``POST /reward`` scores one batch (status 400 for a request that does not follow the format,
    422 for a reward that fails on the batch); ``GET /health`` names the reward and the device.
    Batches are scored one at a time: a reward model need not be thread-safe, and concurrent
    batches on one device would only compete for it.
    """
    from fastapi import FastAPI, Request, Response
    from fastapi.concurrency import run_in_threadpool

    app = FastAPI(title=f"diffusion-env reward server: {reward.name}")
    lock = threading.Lock()

    def score(body: bytes) -> tuple[int, bytes]:
        try:
            pixels, prompts, metadata = decode_request(body)
        except ValueError as error:
            return 400, encode_detail(f"the request does not follow wire format {WIRE_FORMAT}: {error}")
        with lock:
            try:
                result = reward(torch.from_numpy(pixels).to(device), prompts, metadata)
                return 200, encode_reply(result.rewards, result.details)
            except (RewardError, ValueError) as error:
                return 422, encode_detail(str(error))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"reward": reward.name, "device": str(device), "wire_format": WIRE_FORMAT}

    @app.post("/reward")
    async def reward_endpoint(request: Request) -> Response:
        # Scored in a worker thread, so that the event loop keeps answering /health meanwhile.
        status, content = await run_in_threadpool(score, await request.body())
        return Response(content, status_code=status, media_type="application/json")

    return app


def encode_detail(message: str) -> bytes:
    """An error reply's body, ``{"detail": message}`` (FastAPI's own shape for errors)."""
    return json.dumps({"detail": message}).encode("utf-8")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m diffusion_env.rewards.server``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_env.rewards.server",
        description="Serve a reward over HTTP, for environments built with reward='http://HOST:PORT'.",
    )
    parser.add_argument("--reward", required=True, help="registered reward name or weighted combination, e.g. aesthetic")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--device", help="torch device the images, and a reward that is a torch module, are placed on (default: cuda if available, else cpu)"
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> None:
    """Entry point: argument and start-up errors are one line on stderr with exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import fastapi  # noqa: F401  (imported by create_app; checked here for a one-line error)
        import uvicorn
    except ImportError:
        parser.error("the reward server needs fastapi and uvicorn: pip install 'diffusion-env[serve]'")
    if args.reward.startswith(REWARD_URL_SCHEMES):
        parser.error(f"--reward {args.reward!r} is a URL; allowed: a registered reward name or combination to serve here")
    try:
        port = check_int("--port", args.port, 0, 65535)
        device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        reward = make_reward(args.reward)
    except (ValueError, TypeError, OSError, ImportError) as error:
        parser.error(str(error))
    if isinstance(reward.fn, torch.nn.Module):  # e.g. the aesthetic scorer; plain functions follow their images
        reward.fn.to(device)
    app = create_app(reward, device)
    if not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host}, reachable from other machines, without authentication; "
            "bind to 127.0.0.1 and reach it through an SSH tunnel unless the network is trusted",
            file=sys.stderr,
        )
    print(f"serving reward {reward.name!r} on {device} at http://{args.host}:{port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=port, log_level=args.log_level)


if __name__ == "__main__":
    main(sys.argv[1:])
