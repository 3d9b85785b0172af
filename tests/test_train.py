"""The training command: a smoke run of every algorithm, exact resume, atomic checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.train import ALGORITHMS, Run, TrainConfig, parse_args, train
from diffusion_env.prompts import make_prompt_set
from diffusion_env.rewards import make_reward
from diffusion_env.shapes.scenes import parse_scenes

TINY = dict(model="tiny-random", prompts="scenes_train", num_envs=2, batches_per_epoch=1, num_inference_steps=2,
            minibatch_size=2, device="cpu", tracker_min_count=1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_trains_logs_and_checkpoints(tmp_path, algorithm):
    history = train(TrainConfig(algorithm=algorithm, epochs=1, **TINY), tmp_path)
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    assert "charts/reward_mean" in history[0] and any(k.startswith("losses/") for k in history[0])
    assert (tmp_path / "latest").read_text() == "checkpoint-0001"
    assert (tmp_path / "samples-0001.png").exists() and (tmp_path / "reward_curve.png").exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    weights = load_file(tmp_path / "checkpoint-0001" / "trainable.safetensors")
    assert weights and all("lora" in name for name in weights)


def test_monitor_scores_the_epoch_images_without_training_on_them(tmp_path):
    run = Run(TrainConfig(epochs=1, monitor="scene_alignment", **TINY))
    figures, samples = run.train_epoch()
    assert samples.images.shape == (2, 16, 16, 3) and len(samples.metadata) == 2
    parsed = parse_scenes(samples.images.numpy())
    background = np.mean([scene.background == meta["background"] for scene, meta in zip(parsed, samples.metadata)])
    assert figures["charts/monitor/scene_background"] == pytest.approx(background)
    assert 0.0 <= figures["charts/monitor/scene_alignment"] <= 1.0
    # The trained reward is still the configured one (JPEG compressibility: minus the size in kB).
    assert figures["charts/reward_mean"] < 0


def test_full_fine_tuning_saves_the_whole_unet(tmp_path):
    train(TrainConfig(epochs=1, lora_rank=0, **TINY), tmp_path)
    weights = load_file(tmp_path / "checkpoint-0001" / "trainable.safetensors")
    assert "conv_in.weight" in weights


def test_resume_continues_the_run_exactly(tmp_path):
    config = dict(epochs=2, lora_rank=0, learning_rate=1e-3, **TINY)
    straight = train(TrainConfig(**config), tmp_path / "straight")
    train(TrainConfig(**{**config, "epochs": 1}), tmp_path / "split")
    resumed = train(TrainConfig(**config), tmp_path / "split", resume=True)

    def without_timing(history):
        return [{k: v for k, v in h.items() if k != "charts/epoch_seconds"} for h in history]

    assert without_timing(resumed) == without_timing(straight)
    a = load_file(tmp_path / "straight" / "checkpoint-0002" / "trainable.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint-0002" / "trainable.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # An earlier checkpoint can be loaded by its epoch (the learning benchmark compares runs so).
    early = Run(TrainConfig(**config))
    early.load(tmp_path / "straight", epoch=1)
    first = load_file(tmp_path / "straight" / "checkpoint-0001" / "trainable.safetensors")
    assert early.epoch == 1 and all(torch.equal(early.trainable[n], first[n]) for n in first)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        early.load(tmp_path / "straight", epoch=7)


def test_a_killed_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    run = Run(TrainConfig(epochs=2, **TINY))
    run.train_epoch()
    run.save(tmp_path)
    # A write killed half-way leaves only a partial folder, which 'latest' never names.
    partial = tmp_path / ".partial-checkpoint-0002"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"truncated")
    restored = Run(TrainConfig(epochs=2, **TINY))
    restored.load(tmp_path)
    assert restored.epoch == 1
    assert all(torch.equal(restored.trainable[n], p) for n, p in run.trainable.items())


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(epochs=1, **TINY), tmp_path, resume=True)


def test_config_file_and_flags(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text('algorithm = "rwr"\nepochs = 3\nper_prompt_advantages = false\n')
    config, output_dir, resume = parse_args(
        ["--config", str(config_file), "--output-dir", str(tmp_path / "out"), "--epochs", "5", "--guidance-scale", "2.5"]
    )
    assert (config.algorithm, config.epochs, config.per_prompt_advantages, config.guidance_scale) == ("rwr", 5, False, 2.5)
    assert output_dir == tmp_path / "out" and not resume
    with pytest.raises(ValueError, match="algorithm='ppo'; allowed"):
        TrainConfig(algorithm="ppo")
    config_file.write_text("learning_rat = 1e-4\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        parse_args(["--config", str(config_file), "--output-dir", str(tmp_path)])
    json.dumps(vars(config))  # the saved config is plain JSON


@pytest.mark.parametrize("config_file", sorted((Path(__file__).parent.parent / "agents" / "configs").glob("*.toml")))
def test_shipped_configs_name_registered_rewards_and_prompt_sets(config_file, tmp_path):
    config, _, _ = parse_args(["--config", str(config_file), "--output-dir", str(tmp_path)])
    assert make_reward(config.reward).name == config.reward.replace(" ", "")
    assert len(make_prompt_set(config.prompts)) > 0
    if config.monitor is not None:
        make_reward(config.monitor)
    assert config.num_envs % config.samples_per_prompt == 0
