"""The examples run as a user would run them (on the test-sized model, few steps)."""

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
        ("sb3_ppo.py", ["--rollouts", "2", "--num-envs", "2", "--num-inference-steps", "2", "--batch-size", "4",
                        "--model", "tiny-random", "--device", "cpu"]),
    ],
)
def test_example_runs(script, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert "reward" in capsys.readouterr().out
