"""The algorithm register: the built-in algorithms, and a new one trained without touching a project file."""

import json
from dataclasses import dataclass, field

import pytest
import torch

from agents.algorithms import (
    UpdateContext,
    available_algorithms,
    get_algorithm,
    register_algorithm,
    unregister_algorithm,
)
from agents.algorithms.ddpo import DDPOConfig
from agents.algorithms.rwr import RWRConfig
from agents.config import TrainConfig
from agents.rollouts import Trajectories
from agents.train import main, train


@dataclass
class ShrinkConfig:
    """A toy algorithm: weight decay towards zero, scaled by the mean advantage's magnitude plus one."""

    scale: float = field(default=0.5, metadata={"help": "how strongly the weights shrink"})


def shrink(context: UpdateContext, samples: Trajectories, advantages: torch.Tensor) -> dict[str, float]:
    trainable = [p for p in context.policy.parameters() if p.requires_grad]
    context.optimizer.zero_grad(set_to_none=True)
    loss = context.config.scale * (1 + advantages.abs().mean()) * sum(p.square().sum() for p in trainable)
    loss.backward()
    context.optimizer.step()
    return {"losses/shrink": loss.item()}


@pytest.fixture
def toy_algorithm():
    register_algorithm("shrink", ShrinkConfig, shrink, description="a toy algorithm")
    yield "shrink"
    unregister_algorithm("shrink")


def test_the_built_in_algorithms_are_registered():
    assert available_algorithms()[:3] == ["ddpo-is", "ddpo-sf", "rwr"]
    assert get_algorithm("ddpo-sf").make_config().estimator == "sf"
    assert get_algorithm("ddpo-is").config_class is DDPOConfig and get_algorithm("rwr").config_class is RWRConfig
    assert "estimator" not in [f.name for f in get_algorithm("ddpo-is").fields()]  # the name fixes it
    with pytest.raises(ValueError, match=r"algorithm='ppo'; allowed: \['ddpo-is', 'ddpo-sf', 'rwr'"):
        get_algorithm("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("rwr", RWRConfig, shrink)


def test_a_registered_algorithm_trains_through_the_training_api(tmp_path, toy_algorithm):
    config = TrainConfig.from_tables({
        "run": {"epochs": 1, "device": "cpu"},
        "env": {"model": "tiny-random", "num_envs": 2, "samples_per_prompt": 2, "batches_per_epoch": 1, "num_inference_steps": 2},
        "algorithm": {"name": toy_algorithm, "scale": 2},
    })
    assert config.algorithm.config == ShrinkConfig(scale=2.0)
    history = train(config, tmp_path)
    assert history[0]["losses/shrink"] > 0
    saved = json.loads((tmp_path / "checkpoint-0001" / "config.json").read_text())
    assert saved["algorithm"] == {"name": "shrink", "scale": 2.0}


def test_a_registered_algorithms_settings_are_flags(tmp_path, toy_algorithm, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--scale SCALE how strongly the weights shrink [shrink] (default: 0.5)" in help_text
    assert "shrink" in help_text.split("--algorithm NAME")[1].split("(default")[0]
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "--scale", "3", "--device", "cpu"])
    assert "'scale' is no setting of algorithm 'ddpo-is'" in capsys.readouterr().err
