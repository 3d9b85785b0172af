"""Rewards served over HTTP: real servers on 127.0.0.1 (the server module, and misbehaving ones),
the round trip against the in-process reward, and the errors of servers that die, hang or answer garbage."""

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from agents.train import main as train_main
from diffusion_env.rewards import Reward, RewardError, jpeg_compressibility, make_reward
from diffusion_env.rewards.remote import RemoteReward, RemoteRewardError
from diffusion_env.rewards.server import create_app
from diffusion_env.rewards.server import main as server_main

CPU = torch.device("cpu")
PROMPTS = ["a red circle on a blue background", "two green squares"]


class ThreadedServer:
    """A real uvicorn server for ``app`` on 127.0.0.1, in a thread of the test process."""

    def __init__(self, app: FastAPI, port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def serve():
    """Starts ThreadedServers and stops them after the test."""
    started = []

    def start(app: FastAPI, port: int = 0) -> ThreadedServer:
        started.append(ThreadedServer(app, port))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def scripted_app(replies: list[tuple[float, int, bytes]]) -> FastAPI:
    """A server whose n-th ``POST /reward`` waits replies[n][0] seconds and answers status replies[n][1]
    with body replies[n][2] (the last one repeated); ``app.state.requests`` counts the requests."""
    app = FastAPI()
    app.state.requests = 0

    @app.post("/reward")
    async def reward(request: Request) -> Response:
        await request.body()
        app.state.requests += 1
        delay, status, body = replies[min(app.state.requests, len(replies)) - 1]
        await asyncio.sleep(delay)
        return Response(body, status_code=status, media_type="application/json")

    return app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def actions_of(env) -> np.ndarray:
    """A fixed in-bounds action for every step: the episode is a function of the seed alone."""
    return np.full(env.action_space.shape, 0.5, dtype=env.action_space.dtype)


def step_to_last(env) -> None:
    env.reset(seed=3)
    for _ in range(env.unwrapped.core.num_steps - 1):
        env.step(actions_of(env))


def state_of(env) -> tuple[int, torch.Tensor, list[str]]:
    core = env.unwrapped.core
    return core.step_index, core.latents.clone(), list(core.prompts)


def fails_leaving_state_intact(env) -> str:
    """Steps to the last step, checks that it raises RewardError and changes nothing; returns the message."""
    step_to_last(env)
    before = state_of(env)
    with pytest.raises(RewardError) as raised:
        env.step(actions_of(env))
    after = state_of(env)
    assert after[0] == before[0] and torch.equal(after[1], before[1]) and after[2] == before[2]
    return str(raised.value)


def last_rewards(env) -> np.ndarray:
    _, rewards, terminated, _, _ = env.step(actions_of(env))
    assert terminated.all()
    return rewards


def test_round_trip_equals_the_in_process_reward(serve, make_vec_env):
    for name in ("jpeg_compressibility", "jpeg_compressibility+0.5*colorfulness"):
        server = serve(create_app(make_reward(name), CPU))
        assert RemoteReward(server.url).health() == {"reward": name, "device": "cpu", "wire_format": 1}
        images = torch.randint(0, 256, (3, 24, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        metadata = [{"count": np.int64(2)}, {}, {"shape": "circle", "sizes": [1.5, 2]}]
        remote = make_reward(server.url)(images, ["a", "b", "c"], metadata)
        local = make_reward(name)(images, ["a", "b", "c"], metadata)
        assert torch.equal(remote.rewards, local.rewards)
        assert remote.details.keys() == local.details.keys()
        for key, values in local.details.items():
            np.testing.assert_array_equal(remote.details[key], values.astype(np.float32))
    # Through the environment: the same episode pays the same rewards, bit for bit.
    by_url, in_process = make_vec_env(reward=server.url), make_vec_env(reward="jpeg_compressibility+0.5*colorfulness")
    step_to_last(by_url)
    step_to_last(in_process)
    np.testing.assert_array_equal(last_rewards(by_url), last_rewards(in_process))


def test_a_server_killed_mid_run_is_a_clear_error_and_the_step_can_be_retried(serve, make_vec_env):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusion_env.rewards.server", "--reward", "jpeg_compressibility", "--port", str(port),
         "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert RemoteReward(url).wait_until_ready(60)["reward"] == "jpeg_compressibility"
        env = make_vec_env(reward=RemoteReward(url, timeout=5, retries=1, backoff=0.05))
        step_to_last(env)
        served = last_rewards(env)
        reference = make_vec_env(reward="jpeg_compressibility")
        step_to_last(reference)
        np.testing.assert_array_equal(served, last_rewards(reference))
        step_to_last(env)
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=30)
    assert "serving reward 'jpeg_compressibility' on cpu at http://127.0.0.1:" in stderr
    message = fails_leaving_state_intact(env)
    assert url in message and "failed 2 times" in message and "ConnectionRefusedError" in message
    assert "batch of 2 images" in message and repr(PROMPTS[0]) in message
    # The server comes back on the same port: the very step that failed now pays its rewards.
    serve(create_app(make_reward("jpeg_compressibility"), CPU), port=port)
    np.testing.assert_array_equal(last_rewards(env), served)


def test_a_server_slower_than_the_timeout_is_retried_then_a_clear_error(serve, make_vec_env):
    good = json.dumps({"rewards": [1.0, 2.0]}).encode()
    server = serve(scripted_app([(2.0, 200, good), (2.0, 200, good), (0.0, 200, good)]))
    env = make_vec_env(reward=RemoteReward(server.url, timeout=0.3, retries=1, backoff=0.01))
    started = time.monotonic()
    message = fails_leaving_state_intact(env)
    assert time.monotonic() - started < 10
    assert server.url in message and "failed 2 times (timeout 0.3 s each)" in message and "timed out" in message
    assert "batch of 2 images" in message
    assert list(last_rewards(env)) == [1.0, 2.0]  # a retried step, once the server answers in time
    assert server.server.config.app.state.requests == 3


@pytest.mark.parametrize(
    ("status", "body", "expected", "requests"),
    [
        (200, b"<html>busy</html>", "answered garbage: the reply is not JSON", 1),
        (200, b'{"rewards": [1.0]}', '"rewards" holds 1 numbers for 2 images', 1),
        (200, b'{"rewards": [1.0, NaN]}', '"rewards" are [1.0, nan], not all finite float32 numbers', 1),
        (200, b'{"rewards": [[1.0], [2.0]]}', "allowed: a list of 2 numbers", 1),
        (200, b'{"rewards": [1.0, 1e39]}', '"rewards" are [1.0, 1e+39], not all finite float32 numbers', 1),
        (200, b'{"rewards": [1.0, 2.0], "details": {"k": [1]}}', "detail 'k' is [1]; allowed: a list of 2 finite numbers or nulls", 1),
        (200, b"[1.0, 2.0]", "the reply is a JSON list; allowed: a JSON object", 1),
        (404, b'{"detail": "Not Found"}', "refused the batch with HTTP 404: Not Found", 1),
        (500, b"Internal Server Error", "failed 3 times (timeout 5 s each); last: HTTP 500: Internal Server Error", 3),
    ],
)
def test_a_malformed_reply_is_a_clear_error_and_leaves_the_env_intact(serve, make_vec_env, status, body, expected, requests):
    server = serve(scripted_app([(0.0, status, body)] * requests + [(0.0, 200, b'{"rewards": [3.0, 4.0]}')]))
    env = make_vec_env(reward=RemoteReward(server.url, timeout=5, retries=2, backoff=0.01))
    message = fails_leaving_state_intact(env)
    assert expected in message and server.url in message and "batch of 2 images" in message
    assert server.server.config.app.state.requests == requests  # garbage and 4xx are not retried
    assert list(last_rewards(env)) == [3.0, 4.0]


def test_a_5xx_then_an_answer_is_retried_transparently(serve):
    server = serve(scripted_app([(0.0, 503, b"restarting"), (0.0, 200, b'{"rewards": [5.0], "details": {"d": [null]}}')]))
    result = make_reward(server.url)(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), ["p"], [{}])
    assert result.rewards.tolist() == [5.0] and np.isnan(result.details["d"]).all()
    assert server.server.config.app.state.requests == 2


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/reward", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_server_refuses_bad_requests_and_failing_rewards_with_their_reason(serve):
    def fails(images, prompts, metadata):
        raise RuntimeError("model out of memory")

    server = serve(create_app(Reward(fails, name="fails"), CPU))
    status, reply = post(server.url, b'{"images": {"shape": [1, 2, 2, 3], "dtype": "uint8", "data": "AAAA"}}')
    assert status == 400 and '"images.data" holds 3 bytes; allowed: 12 for shape [1, 2, 2, 3]' in reply["detail"]
    status, reply = post(server.url, b"not json")
    assert status == 400 and "the request is not JSON" in reply["detail"]
    with pytest.raises(RemoteRewardError, match="refused the batch with HTTP 422: reward 'fails' raised RuntimeError: model out of memory"):
        RemoteReward(server.url)(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), ["p"], [{}])
    with pytest.raises(RemoteRewardError, match="metadata cannot be sent as JSON"):
        RemoteReward(server.url)(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), ["p"], [{"when": object()}])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--reward", "nope"], "unknown reward 'nope'; allowed: ["),
        (["--reward", "jpeg_compressibility", "--port", "70000"], "--port=70000 is out of range; allowed: an integer 0 <= --port <= 65535"),
        (["--reward", "jpeg_compressibility", "--device", "nodevice"], "device='nodevice' is not a torch device"),
        (["--reward", "http://127.0.0.1:8000"], "is a URL; allowed: a registered reward name or combination"),
        (["--reward", "aesthetic"], "the 'aesthetic' reward needs the LAION predictor weights"),
        (["--port", "8000"], "the following arguments are required: --reward"),
    ],
)
def test_bad_server_arguments_are_one_line_errors(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        server_main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("python -m diffusion_env.rewards.server: error: ") and expected in lines[-1]


@pytest.mark.parametrize(
    ("kwargs", "error", "expected"),
    [
        ({"url": "ftp://host:1"}, ValueError, "is not of the form 'http://host:port'"),
        ({"url": "http://host:1?x=1"}, ValueError, "is not of the form 'http://host:port'"),
        ({"url": "http://host:port"}, ValueError, "is not of the form 'http://host:port'"),
        ({"url": 8000}, ValueError, "is not of the form 'http://host:port'"),
        ({"timeout": 0}, ValueError, "timeout=0 is out of range; allowed: 0 < timeout"),
        ({"retries": -1}, ValueError, "retries=-1 is out of range"),
        ({"retries": 1.5}, TypeError, "retries must be an integer"),
    ],
)
def test_client_arguments_are_checked(kwargs, error, expected):
    with pytest.raises(error, match=expected.replace("?", r"\?")):
        RemoteReward(**{"url": "http://127.0.0.1:1", **kwargs})


def test_a_training_run_whose_server_dies_resumes_once_it_is_back(serve, tmp_path, capsys):
    holder = []

    def jpeg_then_die(images, prompts, metadata):
        holder[0].server.should_exit = True  # the server stops after answering this first batch
        return jpeg_compressibility(images, prompts, metadata)

    holder.append(serve(create_app(Reward(jpeg_then_die, name="jpeg_compressibility"), CPU)))
    url, out = holder[0].url, tmp_path / "run"
    argv = ["--model", "tiny-random", "--num-envs", "2", "--samples-per-prompt", "2", "--batches-per-epoch", "1",
            "--num-inference-steps", "2", "--minibatch-size", "2", "--device", "cpu", "--tracker-min-count", "2",
            "--epochs", "2", "--reward", url, "--output-dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert re.search(f"reward server {re.escape(url)} failed 4 times.*batch of 2 images.*continue with --resume", str(exit_info.value.code))
    assert (out / "latest").read_text().strip() == "checkpoint-0001" and not (out / "checkpoint-0002").exists()
    serve(create_app(make_reward("jpeg_compressibility"), CPU), port=holder[0].port)
    capsys.readouterr()
    train_main(["--output-dir", str(out), "--resume"])
    printed = capsys.readouterr().out
    assert f"resuming {out} from checkpoint-0001 (epoch 1 of 2)" in printed
    assert (out / "latest").read_text().strip() == "checkpoint-0002"
    assert json.loads(printed[printed.index("{"):])["charts/reward_mean"] < 0  # minus a JPEG size in kB
