"""Stable Diffusion 1.x and SDXL as environments: test-sized pipelines built offline, loaded by
folder and as objects, sampled exactly as diffusers samples them, and trained by the agents."""

import json
import logging
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from stable_baselines3 import PPO
from gymnasium.vector import AutoresetMode

from agents import GaussianDenoisingPolicy, collect_trajectories
from agents.config import TrainConfig, read_config_file
from agents.sb3 import DiffusionActorCriticPolicy, SB3VecEnvAdapter
from agents.train import train
from diffusion_env.backends import StableDiffusionBackend, make_denoiser, registered_name
from diffusion_env.backends.tiny_pipelines import MAX_LENGTH, tiny_stable_diffusion, tiny_stable_diffusion_xl

STEPS = 3
PROMPT = "a red cat, 2 dogs"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd")
    tiny_stable_diffusion(folder / "build").save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def plain_ddim_loop(pipeline, latents, noises, guidance_scale, negative_prompt, extra=None):
    """diffusers' UNet + DDIMScheduler.step with the same noise, classifier-free guidance written out."""
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    scheduler.set_timesteps(len(noises))
    tokens = [pipeline.tokenizer(p, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
              for p in (negative_prompt, PROMPT)]
    with torch.no_grad():
        negative, conditional = (pipeline.text_encoder(t)[0] for t in tokens)
        for t, noise in zip(scheduler.timesteps, noises):
            output = pipeline.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([negative, conditional])).sample
            output_negative, output_conditional = output.chunk(2)
            eps = output_negative + guidance_scale * (output_conditional - output_negative)
            latents = scheduler.step(eps, t, latents, eta=1.0, variance_noise=noise).prev_sample
    return latents


def test_a_pipeline_folder_is_an_environment_with_the_checkpoints_scheduler_as_ddim(sd_folder, caplog):
    with caplog.at_level(logging.INFO, logger="diffusion_env.backends.stable_diffusion"):
        env = gym.make("DiffusionDenoise-v0", model=str(sd_folder), prompts=[PROMPT], num_inference_steps=STEPS)
    assert "built from the checkpoint's PNDMScheduler" in caplog.text
    backend = env.unwrapped.backend
    assert isinstance(backend, StableDiffusionBackend) and registered_name(backend) == str(sd_folder)
    assert isinstance(backend.scheduler, DDIMScheduler) and backend.scheduler.config.steps_offset == 1
    assert env.observation_space["latent"].shape == (4, 8, 8)
    assert env.observation_space["prompt_embedding"].shape == (MAX_LENGTH, 32)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def test_height_width_and_the_negative_prompt_are_environment_arguments(sd_folder):
    env = gym.make("DiffusionDenoise-v0", model=str(sd_folder), prompts=[PROMPT], num_inference_steps=2,
                   height=24, width=32, negative_prompt="blurry", render_mode="rgb_array")
    assert env.observation_space["latent"].shape == (4, 12, 16)
    assert env.unwrapped.backend.negative_prompt == "blurry"
    env.reset(seed=0)
    assert env.render().shape == (24, 32, 3)
    with pytest.raises(ValueError, match=r"width=29; allowed: a positive multiple of the VAE's scale factor 2"):
        gym.make("DiffusionDenoise-v0", model=str(sd_folder), width=29)
    with pytest.raises(ValueError, match=r"model 'tiny-random' takes no option\(s\) \['height'\]"):
        gym.make("DiffusionDenoise-v0", model="tiny-random", height=32)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_the_policy_through_the_env_reproduces_diffusers_ddim_loop(tmp_path, guidance_scale):
    pipeline = tiny_stable_diffusion(tmp_path)
    env = gym.make("DiffusionDenoise-v0", model=pipeline, prompts=[PROMPT], num_inference_steps=STEPS,
                   guidance_scale=guidance_scale, negative_prompt="blurry")
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    start = torch.as_tensor(obs["latent"])[None]
    noises = torch.randn((STEPS, 1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    for noise in noises:
        with torch.no_grad():
            action, log_prob = policy.sample_with_log_prob(obs, noise=noise)
            mean = policy.mean(obs)
        expected = torch.distributions.Normal(mean.double(), policy.std(obs).double().reshape(-1, 1, 1, 1))
        torch.testing.assert_close(log_prob.double(), expected.log_prob(action.double()).sum(dim=(1, 2, 3)), rtol=1e-6, atol=1e-4)
        obs, reward, terminated, _, info = env.step(action[0].numpy())
    assert terminated and info["image"].shape == (16, 16, 3)
    expected_latents = plain_ddim_loop(pipeline, start, noises, guidance_scale, "blurry")
    torch.testing.assert_close(torch.as_tensor(obs["latent"])[None], expected_latents, rtol=1e-5, atol=1e-5)


def test_sdxl_observes_pooled_embeddings_and_time_ids_and_reproduces_its_unet_loop(tmp_path):
    pipeline = tiny_stable_diffusion_xl(tmp_path)
    env = gym.make("DiffusionDenoise-v0", model=pipeline, prompts=[PROMPT], num_inference_steps=STEPS, guidance_scale=3.0)
    assert set(env.observation_space.spaces) == {"latent", "timestep", "prompt_embedding", "pooled_prompt_embedding", "time_ids"}
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs["time_ids"], [16, 16, 0, 0, 16, 16])
    latents = torch.as_tensor(obs["latent"])[None]
    noises = torch.randn((STEPS, 1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    for noise in noises:
        with torch.no_grad():
            action = policy.sample(obs, noise=noise)
        obs, *_ = env.step(action[0].numpy())
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(PROMPT, device="cpu")
        assert torch.count_nonzero(negative) == 0  # SDXL's zeroed empty negative prompt
        time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
        for t, noise in zip(scheduler.timesteps, noises):
            output = pipeline.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([negative, embeds]),
                                   added_cond_kwargs={"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids}).sample
            uncond, cond = output.chunk(2)
            latents = scheduler.step(uncond + 3.0 * (cond - uncond), t, latents, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(torch.as_tensor(obs["latent"])[None], latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["ddpo-is", "rwr"])
def test_the_agents_train_stable_diffusion_with_lora_and_resume_exactly(sd_folder, tmp_path, algorithm):
    def config(epochs):
        return TrainConfig.from_tables({
            "run": {"epochs": epochs, "device": "cpu"},
            "env": {"model": str(sd_folder), "prompts": "scenes_train", "num_envs": 2, "samples_per_prompt": 2,
                    "batches_per_epoch": 1, "num_inference_steps": 2, "guidance_scale": 2.0, "height": 24,
                    "negative_prompt": "blurry"},
            "reward": {"name": "colorfulness"},
            "advantages": {"tracker_min_count": 1},
            "optimizer": {"lora_rank": 2, "learning_rate": 1e-2},
            "algorithm": {"name": algorithm, "minibatch_size": 2},
        })

    straight = train(config(2), tmp_path / "straight")
    train(config(1), tmp_path / "split")
    resumed = train(config(2), tmp_path / "split", resume=True)
    strip = lambda history: [{k: v for k, v in h.items() if k != "charts/epoch_seconds"} for h in history]  # noqa: E731
    assert strip(resumed) == strip(straight)
    assert all(np.isfinite(list(h.values())).all() for h in straight)
    saved = json.loads((tmp_path / "split" / "checkpoint-0002" / "config.json").read_text())
    assert saved["env"]["model"] == str(sd_folder) and saved["env"]["height"] == 24


def test_sb3_ppo_runs_on_stable_diffusion_named_by_its_folder(sd_folder):
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=2, model=str(sd_folder), prompts=[PROMPT], num_inference_steps=2,
                        autoreset_mode=AutoresetMode.SAME_STEP)
    kwargs = {"model": str(sd_folder), "num_inference_steps": 2, "lora_rank": 2, "per_dimension_ratio": True}
    model = PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=2, batch_size=4, n_epochs=1, ent_coef=0.0,
                clip_range=1e-3, device="cpu", policy_kwargs=kwargs, seed=0)
    model.learn(total_timesteps=4)
    assert any("lora" in name for name in model.policy.state_dict())


def test_two_environments_over_one_back_end_share_its_adapters(sd_folder):
    backend = make_denoiser(str(sd_folder))
    first, second = (gym.make("DiffusionDenoise-v0", model=backend, prompts=[PROMPT], num_inference_steps=2) for _ in range(2))
    adapters = GaussianDenoisingPolicy.from_env(first).add_lora(2)
    assert GaussianDenoisingPolicy.from_env(second).add_lora(2).keys() == adapters.keys()
    with pytest.raises(ValueError, match="already carries LoRA adapters of rank 2"):
        GaussianDenoisingPolicy.from_env(second).add_lora(4)


def test_the_policy_holds_the_network_alone_and_moves_the_whole_back_end(sd_folder):
    env = gym.make("DiffusionDenoise-v0", model=str(sd_folder), prompts=[PROMPT], num_inference_steps=2)
    policy = GaussianDenoisingPolicy.from_env(env)
    backend = env.unwrapped.backend
    assert {name.split(".")[0] for name in policy.state_dict()} == {"network"}
    assert sum(p.numel() for p in policy.parameters()) == sum(p.numel() for p in backend.unet.parameters())
    policy.to(torch.float64)
    assert next(backend.vae.parameters()).dtype == torch.float64 and next(backend.unet.parameters()).dtype == torch.float64


def test_a_checkpoint_that_is_not_on_disk_is_named_and_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"cannot load pipeline 'nobody/no-such-model': files missing in the local Hugging Face cache"):
        make_denoiser("nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match="holds no model_index.json"):
        make_denoiser(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cannot load pipeline 'stable-diffusion-v1-5/stable-diffusion-v1-5'"):
        make_denoiser("sd-1.5")


@pytest.mark.parametrize("task", ["aesthetic", "compressibility", "incompressibility", "prompt_alignment"])
def test_the_papers_stable_diffusion_configs_are_valid_and_run_on_the_tiny_model(task, sd_folder, tmp_path):
    path = Path(__file__).resolve().parent.parent / "agents" / "configs" / f"sd15_{task}.toml"
    tables = read_config_file(path)
    config = TrainConfig.from_tables(tables, source=str(path))
    assert (config.env.model, config.env.num_inference_steps, config.env.guidance_scale) == ("sd-1.5", 50, 5.0)
    assert (config.optimizer.lora_rank, config.algorithm.name) == (4, "ddpo-is")
    assert config.env.prompts in ("animals", "animal_activities")
    # The same settings on the tiny pipeline, at a few steps and a reward that loads no model.
    small = {**tables, "run": {"epochs": 1, "device": "cpu"}, "reward": {"name": "jpeg_compressibility"},
             "env": {**tables["env"], "model": str(sd_folder), "num_inference_steps": 2, "num_envs": 2, "batches_per_epoch": 1}}
    history = train(TrainConfig.from_tables(small), tmp_path)
    assert np.isfinite(history[0]["charts/reward_mean"])


def test_half_precision_networks_train_float32_lora_adapters_under_autocast():
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=2, model="tiny-sd", prompts=[PROMPT], num_inference_steps=2,
                        dtype=torch.bfloat16, array_type="torch",
                        model_options={"gradient_checkpointing": True, "channels_last": True, "frozen_dtype": torch.bfloat16})
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    adapters = policy.add_lora(2, seed=0)
    backend = envs.unwrapped.backend
    assert backend.dtype == torch.bfloat16 and next(backend.vae.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    assert backend.unet.is_gradient_checkpointing
    trajectories = collect_trajectories(envs, policy, seed=0)
    observation = trajectories.observations(torch.tensor([0, 1]), torch.tensor([0, 1]))
    loss = policy.log_prob(observation, trajectories.actions(torch.tensor([0, 1]), torch.tensor([0, 1]))).sum()
    loss.backward()
    gradients = [p.grad for p in adapters.values() if p.grad is not None]
    assert gradients and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in gradients)
    assert any(bool(g.abs().sum() > 0) for g in gradients)
