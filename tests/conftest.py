"""Shared fixtures. Nothing here may reach the network: the hub is switched off for the session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gymnasium as gym  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import diffusion_env  # noqa: E402,F401  (registers DiffusionDenoise-v0)

# Few steps keep every rollout test to a second or two on a CPU.
NUM_STEPS = 4


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def make_env():
    """gym.make with the test defaults; closes what it made."""
    made = []

    def factory(**kwargs):
        kwargs.setdefault("model", "tiny-random")
        kwargs.setdefault("num_inference_steps", NUM_STEPS)
        kwargs.setdefault("prompts", ["a red circle on a blue background", "two green squares"])
        env = gym.make("DiffusionDenoise-v0", **kwargs)
        made.append(env)
        return env

    yield factory
    for env in made:
        env.close()


@pytest.fixture
def make_vec_env():
    """gym.make_vec with the test defaults; closes what it made."""
    made = []

    def factory(num_envs=2, **kwargs):
        kwargs.setdefault("model", "tiny-random")
        kwargs.setdefault("num_inference_steps", NUM_STEPS)
        kwargs.setdefault("prompts", ["a red circle on a blue background", "two green squares"])
        env = gym.make_vec("DiffusionDenoise-v0", num_envs=num_envs, **kwargs)
        made.append(env)
        return env

    yield factory
    for env in made:
        env.close()


@pytest.fixture
def trained_steps(monkeypatch):
    """The sorted step indices each call of ``Trajectories.minibatches`` was given, recorded in a list."""
    from agents.rollouts import Trajectories

    recorded = []
    original = Trajectories.minibatches

    def recording(self, size, generator, steps=None, *args, **kwargs):
        recorded.append(sorted(steps.tolist()))
        return original(self, size, generator, steps, *args, **kwargs)

    monkeypatch.setattr(Trajectories, "minibatches", recording)
    return recorded
