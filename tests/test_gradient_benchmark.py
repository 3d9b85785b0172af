"""The gradient benchmark splits one epoch's DDPO-IS gradient by step, and compares epochs."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from agents.config import TrainConfig
from agents.losses import clipped_surrogate_loss
from diffusion_env.samplers.base import per_dimension
from agents.train import Run, train

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gradient_by_step.py"
SETTINGS = {
    "env": {"model": "tiny-random", "num_envs": 4, "samples_per_prompt": 2, "batches_per_epoch": 1, "num_inference_steps": 4},
    "optimizer": {"lora_rank": 0},
    "algorithm": {"name": "ddpo-is", "clip_range": 1e-3},
}
CONFIG_TOML = """
[env]
model = "tiny-random"
num_envs = 4
samples_per_prompt = 2
batches_per_epoch = 1
num_inference_steps = 4

[optimizer]
lora_rank = 0

[algorithm]
name = "ddpo-is"
clip_range = 1e-3
"""


def test_the_steps_gradients_add_up_to_the_gradient_of_the_whole_epoch():
    gradients_by_step = runpy.run_path(str(SCRIPT))["gradients_by_step"]
    config = TrainConfig.from_tables({**SETTINGS, "run": {"device": "cpu"}})
    by_step = gradients_by_step(Run(config))
    assert len(by_step) == config.env.num_inference_steps
    # The same epoch again (same seed), all (sample, step) pairs in one loss.
    run = Run(config)
    samples = run.collect()
    advantages = run.advantages(samples)
    pairs = torch.cartesian_prod(torch.arange(samples.batch_size), torch.arange(samples.num_steps))
    indices, steps = pairs[:, 0], pairs[:, 1]
    actions = samples.actions(indices, steps)
    log_probs = run.policy.log_prob(samples.observations(indices, steps), actions)
    log_ratio = per_dimension(log_probs - samples.log_probs[indices, steps], actions)
    loss, _ = clipped_surrogate_loss(log_ratio, advantages[indices], config.algorithm.config.clip_range)
    (loss * samples.num_steps).backward()  # the mean over all pairs is the mean of the per-step means
    whole = torch.cat([p.grad.flatten() for p in run.trainable.values()])
    assert whole.norm() > 0
    # Equal up to float32 rounding (one network call per step against one for all pairs): 2e-5 measured.
    assert float((sum(by_step) - whole).norm() / whole.norm()) < 1e-4


def test_the_script_prints_each_step_and_the_cosines_between_epochs(tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "config.toml"
    config_file.write_text(CONFIG_TOML)
    monkeypatch.setattr(sys, "argv", ["gradient_by_step.py", "--config", str(config_file), "--batches", "3", "--window", "2"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    step_rows = [line.split("|") for line in lines if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(row[1]) for row in step_rows] == [0, 1, 2, 3]
    assert sum(float(row[5].strip().rstrip("%")) for row in step_rows) == pytest.approx(100, abs=0.3)
    window_rows = [line.split("|") for line in lines if line.startswith("| 0-1 ") or line.startswith("| 2-3 ")]
    assert len(window_rows) == 2
    for row in window_rows:
        mean, pairs = row[2].split(" (")
        values = [float(v) for v in pairs.rstrip(") ").split(", ")]
        assert len(values) == 3 and all(-1 <= v <= 1 for v in values)
        assert float(mean) == pytest.approx(sum(values) / 3, abs=2e-3)


def test_the_script_reads_a_training_run_at_a_checkpoint(tmp_path, monkeypatch, capsys):
    config = TrainConfig.from_tables({**SETTINGS, "run": {"device": "cpu", "epochs": 2}})
    train(config, tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["gradient_by_step.py", "--run", f"{tmp_path / 'run'}:1"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 samples an epoch, 1 epoch(s), jpeg_compressibility")
    assert len([line for line in lines if line.startswith("| ") and line.split("|")[1].strip().isdigit()]) == 4
