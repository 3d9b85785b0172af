"""The examples run as a user would run them (on the test-sized model, few steps)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    "script, argv",
    [
        ("reinforce_with_baseline.py", ["--epochs", "2", "--num-envs", "2", "--num-inference-steps", "2", "--model", "tiny-random"]),
        ("denoising_mdp.py", []),
        ("plugging_in.py", ["--model", "my-tiny", "--num-inference-steps", "4", "--window", "1", "3"]),
        ("reward_server.py", ["--model", "tiny-random", "--num-inference-steps", "2"]),
        ("flow_model.py", ["--model", "tiny-flux", "--noise", "cps", "--num-inference-steps", "3"]),
    ],
)
def test_example_runs(script, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert "reward" in capsys.readouterr().out


def test_sb3_ppo_example_writes_its_reward_history_and_weights(tmp_path, monkeypatch, capsys):
    argv = ["--rollouts", "2", "--num-envs", "2", "--samples-per-prompt", "2", "--num-inference-steps", "2", "--batch-size", "4", "--min-sigma", "0",
            "--model", "tiny-random", "--device", "cpu", "--output-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["sb3_ppo.py", *argv])
    runpy.run_path(str(EXAMPLES / "sb3_ppo.py"), run_name="__main__")
    assert "mean reward: first rollout" in capsys.readouterr().out
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["charts/reward_queries"] for h in history] == [2.0, 4.0]
    assert all(h["charts/reward_mean"] < 0 for h in history)  # minus the JPEG size in kB
    assert (tmp_path / "actor.safetensors").stat().st_size > 0
