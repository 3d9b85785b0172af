"""The training API: a smoke run of every algorithm, exact resume, atomic checkpoints, the KL reference,
reproducible LoRA runs, what a run records, and the warning of an update without signal."""

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from agents.algorithms import AdaptersDisabledReference
from agents.config import ConfigError, TrainConfig, merge_tables
from agents.policy import GaussianDenoisingPolicy
from agents.train import Run, train
from diffusion_env.backends import make_denoiser, tiny_random_denoiser
from diffusion_env.prompts import make_prompt_set
from diffusion_env.rewards import make_reward
from diffusion_env.shapes.scenes import parse_scenes
from tests.conftest import NUM_STEPS

CONFIGS = Path(__file__).parent.parent / "agents" / "configs"
# Two samples of one prompt per batch: the per-prompt advantages are +-1, never 0.
TINY = {
    "run": {"device": "cpu"},
    "env": {"model": "tiny-random", "prompts": "scenes_train", "num_envs": 2, "samples_per_prompt": 2,
            "batches_per_epoch": 1, "num_inference_steps": 2},
    "advantages": {"tracker_min_count": 2},
    "algorithm": {"minibatch_size": 2},
}


def tiny(**tables) -> TrainConfig:
    """The tiny config with the given tables' entries replaced."""
    return TrainConfig.from_tables(merge_tables(TINY, tables))


def without_timing(history):
    return [{k: v for k, v in h.items() if k != "charts/epoch_seconds"} for h in history]


@pytest.mark.parametrize("algorithm", ["ddpo-is", "ddpo-sf", "rwr"])
def test_every_algorithm_trains_logs_and_checkpoints(tmp_path, algorithm):
    config = tiny(run={"epochs": 1}, algorithm={"name": algorithm, "minibatch_size": 2})
    history = train(config, tmp_path)
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    assert "charts/reward_mean" in history[0] and "losses/grad_norm" in history[0]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0001"
    assert (tmp_path / "samples-0001.png").exists() and (tmp_path / "reward_curve.png").exists()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    weights = load_file(tmp_path / "checkpoint-0001" / "trainable.safetensors")
    assert weights and all("lora" in name for name in weights)
    saved = json.loads((tmp_path / "checkpoint-0001" / "config.json").read_text())
    assert saved["algorithm"]["name"] == algorithm and TrainConfig.from_tables(saved) == config


def test_monitor_scores_the_epoch_images_without_training_on_them():
    run = Run(tiny(run={"epochs": 1}, reward={"monitor": "scene_alignment"}))
    figures, samples = run.train_epoch()
    assert samples.images.shape == (2, 16, 16, 3) and len(samples.metadata) == 2
    parsed = parse_scenes(samples.images.numpy())
    background = np.mean([scene.background == meta["background"] for scene, meta in zip(parsed, samples.metadata)])
    assert figures["charts/monitor/scene_background"] == pytest.approx(background)
    assert 0.0 <= figures["charts/monitor/scene_alignment"] <= 1.0
    # The trained reward is still the configured one (JPEG compressibility: minus the size in kB).
    assert figures["charts/reward_mean"] < 0


def test_full_fine_tuning_saves_the_whole_unet(tmp_path):
    train(tiny(run={"epochs": 1}, optimizer={"lora_rank": 0}), tmp_path)
    weights = load_file(tmp_path / "checkpoint-0001" / "trainable.safetensors")
    assert "conv_in.weight" in weights


def test_resume_continues_the_run_exactly(tmp_path):
    config = tiny(run={"epochs": 2}, optimizer={"lora_rank": 0, "learning_rate": 1e-3})
    straight = train(config, tmp_path / "straight")
    train(config.with_changes({"run": {"epochs": 1}}), tmp_path / "split")
    resumed = train(config, tmp_path / "split", resume=True)
    assert without_timing(resumed) == without_timing(straight)
    a = load_file(tmp_path / "straight" / "checkpoint-0002" / "trainable.safetensors")
    b = load_file(tmp_path / "split" / "checkpoint-0002" / "trainable.safetensors")
    first = load_file(tmp_path / "straight" / "checkpoint-0001" / "trainable.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert any(not torch.equal(a[name], first[name]) for name in a), "training changed nothing"
    # An earlier checkpoint can be loaded by its epoch (the learning benchmark compares runs so).
    early = Run(config)
    early.load(tmp_path / "straight", epoch=1)
    assert early.epoch == 1 and all(torch.equal(early.trainable[n], first[n]) for n in first)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        early.load(tmp_path / "straight", epoch=7)


def test_resume_refuses_changed_settings_naming_each(tmp_path):
    config = tiny(run={"epochs": 1}, optimizer={"learning_rate": 1e-3})
    train(config, tmp_path)
    changed = config.with_changes({"optimizer": {"learning_rate": 5e-4}, "env": {"eta": 0.5}})
    with pytest.raises(ValueError) as error:
        train(changed, tmp_path, resume=True)
    message = str(error.value)
    assert "[optimizer] learning_rate: saved 0.001, given 0.0005" in message
    assert "[env] eta: saved None, given 0.5" in message and "[run] epochs" in message  # allowed changes listed
    # More epochs is allowed and continues from the checkpoint.
    assert len(train(config.with_changes({"run": {"epochs": 2}}), tmp_path, resume=True)) == 2


def test_a_killed_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    run = Run(tiny(run={"epochs": 2}))
    run.train_epoch()
    run.save(tmp_path)
    # A write killed half-way leaves only a partial folder, which 'latest' never names.
    partial = tmp_path / ".partial-checkpoint-0002"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"truncated")
    restored = Run(tiny(run={"epochs": 2}))
    restored.load(tmp_path)
    assert restored.epoch == 1
    assert all(torch.equal(restored.trainable[n], p) for n, p in run.trainable.items())


def test_resume_without_a_checkpoint_is_refused_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(run={"epochs": 1}), tmp_path / "run", resume=True)
    assert not (tmp_path / "run").exists()


def test_a_run_is_not_overwritten_without_overwrite(tmp_path):
    train(tiny(run={"epochs": 2}), tmp_path)
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        train(tiny(run={"epochs": 1}), tmp_path)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0002"
    train(tiny(run={"epochs": 1}), tmp_path, overwrite=True)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0001"
    assert not (tmp_path / "checkpoint-0002").exists() and not (tmp_path / "samples-0002.png").exists()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_with_lora_the_kl_reference_is_the_network_with_adapters_off(monkeypatch):
    copied = []
    original = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda value, *args: copied.append(type(value)) or original(value, *args))
    # One optimiser step per epoch (2 samples x 2 steps = 2 minibatches, accumulated): the first
    # epoch's KL is measured before any update.
    algorithm = {"kl_coefficient": 1.0, "gradient_accumulation": 2, "minibatch_size": 2}
    run = Run(tiny(run={"epochs": 2}, optimizer={"learning_rate": 1e-2}, algorithm=algorithm))
    assert isinstance(run.reference, AdaptersDisabledReference)
    assert GaussianDenoisingPolicy not in copied
    first, _ = run.train_epoch()
    second, _ = run.train_epoch()
    # LoRA's B starts at zero: the policy starts exactly at the pretrained one.
    assert first["losses/kl_to_reference"] == 0.0
    assert second["losses/kl_to_reference"] > 0.0
    assert run.policy.has_lora  # the adapters are back on after each reference call
    full = Run(tiny(optimizer={"lora_rank": 0}, algorithm=algorithm))
    assert isinstance(full.reference, GaussianDenoisingPolicy) and full.reference is not full.policy
    # Full fine-tuning copies the network alone; the back-end's other parts are shared.
    assert GaussianDenoisingPolicy not in copied and UNet2DConditionModel in copied
    assert full.reference.network is not full.policy.network
    assert full.reference.backend.prompt_encoder is full.policy.backend.prompt_encoder


def test_lora_runs_with_the_same_seed_are_identical(tmp_path):
    config = tiny(run={"epochs": 2, "seed": 3}, optimizer={"learning_rate": 1e-2})
    first = train(config, tmp_path / "a")
    second = train(config, tmp_path / "b")
    assert without_timing(first) == without_timing(second)
    a = load_file(tmp_path / "a" / "checkpoint-0002" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-0002" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    # The seed also draws LoRA's A matrices: another seed, other adapters.
    other = Run(tiny(run={"seed": 4}))
    same = Run(tiny(run={"seed": 3}))
    lora_a = [name for name in same.trainable if "lora_A" in name]
    assert lora_a and not all(torch.equal(same.trainable[n], other.trainable[n]) for n in lora_a)


def test_a_model_object_is_recorded_by_its_registered_name(tmp_path):
    named = tiny(run={"epochs": 1})
    named.env.model = make_denoiser("tiny-random")
    train(named, tmp_path / "named")
    saved = json.loads((tmp_path / "named" / "checkpoint-0001" / "config.json").read_text())
    assert saved["env"]["model"] == "tiny-random"
    unnamed = tiny(run={"epochs": 1})
    unnamed.env.model = tiny_random_denoiser()
    with pytest.raises(ConfigError, match="records its model by name.*register_model"):
        train(unnamed, tmp_path / "unnamed")
    assert not (tmp_path / "unnamed").exists()
    # In memory a back-end object runs as it is.
    assert Run(unnamed).policy.backend is unnamed.env.model


def test_an_update_without_signal_warns_once(tmp_path):
    # One sample per prompt, normalised by its own statistics: every advantage is 0.
    config = tiny(run={"epochs": 2}, env={"samples_per_prompt": 1}, advantages={"tracker_min_count": 1})
    with pytest.warns(UserWarning, match="no learning signal") as record:
        train(config, tmp_path)
    assert len([w for w in record if "no learning signal" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no learning signal")
        Run(tiny()).train_epoch()


def test_training_steps_come_from_the_step_window(trained_steps):
    run = Run(tiny(env={"num_inference_steps": NUM_STEPS}))
    sigma = run.policy.sampler.sigma.cpu()
    run.config.algorithm.config.min_sigma = float(sigma.sort().values[1])
    run.train_epoch()
    assert trained_steps == [sorted(set(range(NUM_STEPS)) - {int(sigma.argmin())})]


# The built-in model's configs; the Stable Diffusion ones (sd15_*) are tested in test_stable_diffusion.py.
BUILT_IN_CONFIGS = sorted(path for path in CONFIGS.rglob("*.toml") if not path.name.startswith("sd15_"))


@pytest.mark.parametrize("config_file", BUILT_IN_CONFIGS, ids=lambda path: str(path.relative_to(CONFIGS)))
def test_shipped_configs_name_registered_rewards_and_prompt_sets(config_file):
    import tomllib

    config = TrainConfig.from_tables(tomllib.loads(config_file.read_text()), str(config_file))
    assert make_reward(config.reward.name).name == config.reward.name.replace(" ", "")
    assert len(make_prompt_set(config.env.prompts)) > 0
    if config.reward.monitor is not None:
        make_reward(config.reward.monitor)
    assert config.env.num_envs % config.env.samples_per_prompt == 0
    # The recipes use the two policy-gradient algorithms; the comparison runs every registered one.
    algorithms = ("ddpo-is", "ddpo-sf", "rwr", "grpo") if config_file.parent.name == "comparison" else ("ddpo-is", "grpo")
    assert config.optimizer.lora_rank == 0 and config.algorithm.name in algorithms


def test_a_compiled_network_trains_as_the_eager_one(tmp_path):
    # dynamo captures the network's graphs for real; the "eager" backend runs them without code
    # generation (inductor's, for a GPU, takes a minute on a CPU), so the figures match exactly.
    plain, compiled = (Run(tiny(run={"epochs": 1, "compile": backend})) for backend in (None, "eager"))
    for run in (plain, compiled):
        run.train_epoch()
    for name, parameter in plain.trainable.items():
        assert torch.equal(compiled.trainable[name], parameter), name
    with pytest.raises(ConfigError, match="allowed: a torch.compile backend"):
        tiny(run={"compile": "no-such-backend"})
