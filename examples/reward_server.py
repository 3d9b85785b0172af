"""A reward served by another process: start a reward server, point the environment at its URL.

    python examples/reward_server.py [--model tiny-random] [--num-inference-steps 10] [--port 8000]

Starts ``python -m diffusion_env.rewards.server --reward jpeg_compressibility`` in a subprocess
(it needs the ``serve`` extra: fastapi and uvicorn), builds DiffusionDenoise-v0 with
``reward="http://127.0.0.1:<port>"``, walks one episode with the model's own sampler, and shuts the
server down. A large reward model (``--reward aesthetic``) is served the same way, once for many
training processes.
"""

import argparse
import socket
import subprocess
import sys

import gymnasium as gym
import torch

import diffusion_env  # noqa: F401  (registers DiffusionDenoise-v0)
from agents import GaussianDenoisingPolicy
from diffusion_env.envs import DEFAULT_MODEL
from diffusion_env.rewards.remote import RemoteReward

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default=DEFAULT_MODEL, help="registered model name")
parser.add_argument("--num-inference-steps", type=int, default=10)
parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
args = parser.parse_args()

port = args.port
if port == 0:
    with socket.socket() as probe:  # a port free now, for the server to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
url = f"http://127.0.0.1:{port}"
server = subprocess.Popen(
    [sys.executable, "-m", "diffusion_env.rewards.server", "--reward", "jpeg_compressibility", "--port", str(port),
     "--log-level", "warning"]
)
try:
    print(f"reward server at {url}: {RemoteReward(url).wait_until_ready(seconds=120)}")
    env = gym.make("DiffusionDenoise-v0", model=args.model, num_inference_steps=args.num_inference_steps, reward=url)
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, info = env.reset(seed=0)
    terminated = False
    with torch.no_grad():
        while not terminated:
            action = policy.distribution(obs).mean  # the sampler's step without its noise
            obs, reward, terminated, truncated, info = env.step(action[0].numpy())
    print(f"prompt {info['prompt']!r}: reward {reward:.3f} from the server ({info['reward_details']})")
    env.close()
finally:
    server.terminate()
    server.wait(timeout=30)
