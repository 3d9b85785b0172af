"""DiffusionDenoise-v0 as a Gymnasium environment: checkers, seeding, the vector env and its modes."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

from agents import GaussianDenoisingPolicy
from diffusion_env import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from tests.conftest import NUM_STEPS


def rollout(env, policy, seed, noise_seed=0):
    """Observations, rewards and infos of one episode with the policy and seeded noise."""
    generator = torch.Generator().manual_seed(noise_seed)
    obs, info = env.reset(seed=seed)
    trajectory = [(obs, np.zeros(env.unwrapped.core.num_envs, dtype=np.float32), info)]
    done = False
    while not done:
        with torch.no_grad():
            action = policy.sample(obs, generator=generator).numpy()
        batched = np.ndim(obs["latent"]) == 4
        obs, reward, terminated, truncated, info = env.step(action if batched else action[0])
        trajectory.append((obs, np.atleast_1d(reward), info))
        done = bool(np.all(terminated))
    return trajectory


def test_gymnasium_check_env_passes_without_warnings(make_env):
    env = make_env(render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


def test_stable_baselines3_check_env_passes(make_env):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make_env()
    with warnings.catch_warnings():
        # SB3 warns about the image-like float latent and the non-[-1, 1] action box; both intended.
        warnings.simplefilter("ignore", UserWarning)
        sb3_check_env(env.unwrapped, warn=True)


def test_spaces_and_episode_structure(make_env):
    env = make_env()
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert set(obs) == {"latent", "timestep", "prompt_embedding"}
    assert all(v.dtype == np.float32 for v in obs.values())
    assert info["prompt"] in ("a red circle on a blue background", "two green squares")
    assert np.isfinite(env.action_space.low).all() and np.isfinite(env.action_space.high).all()
    timesteps = [float(obs["timestep"][0])]
    for k in range(NUM_STEPS):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample() * 0.01)
        timesteps.append(float(obs["timestep"][0]))
        assert terminated == (k == NUM_STEPS - 1) and not truncated
        assert obs in env.observation_space
        if not terminated:
            assert reward == 0.0 and "image" not in info
    assert info["image"].dtype == np.uint8 and info["image"].shape == (16, 16, 3)
    assert reward == pytest.approx(-float(info["reward_details"]["jpeg_kb"]))
    core = env.unwrapped.core
    assert timesteps == [float(t) for t in core.sampler.timesteps] + [-1.0]


def test_reset_with_a_seed_is_deterministic(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    first = rollout(env, policy, seed=42)
    second = rollout(env, policy, seed=42)
    other = rollout(env, policy, seed=43)
    for (obs_a, r_a, _), (obs_b, r_b, _) in zip(first, second):
        np.testing.assert_array_equal(obs_a["latent"], obs_b["latent"])
        np.testing.assert_array_equal(r_a, r_b)
    assert not np.array_equal(first[0][0]["latent"], other[0][0]["latent"])


def test_single_env_equals_make_vec_with_one_env(make_env, make_vec_env):
    single = make_env()
    vector = make_vec_env(num_envs=1)
    single_run = rollout(single, GaussianDenoisingPolicy.from_env(single), seed=7)
    vector_run = rollout(vector, GaussianDenoisingPolicy.from_env(vector), seed=7)
    assert len(single_run) == len(vector_run) == NUM_STEPS + 1
    for (obs_s, r_s, info_s), (obs_v, r_v, info_v) in zip(single_run, vector_run):
        for key in obs_s:
            np.testing.assert_allclose(obs_s[key], obs_v[key][0], rtol=1e-6, atol=1e-6)
        assert r_s[0] == pytest.approx(float(r_v[0]))
        assert info_s["prompt"] == info_v["prompt"][0]
    np.testing.assert_array_equal(single_run[-1][2]["image"], vector_run[-1][2]["image"][0])


def test_make_vec_resolves_to_the_native_vector_env(make_vec_env):
    env = make_vec_env(num_envs=3)
    assert isinstance(env.unwrapped, DiffusionDenoiseVectorEnv)
    assert isinstance(env.unwrapped, gym.vector.VectorEnv)
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert env.single_action_space.shape == (3, 16, 16)
    assert env.action_space.shape == (3, 3, 16, 16)
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space
    assert info["prompt"].shape == (3,) and info["_prompt"].all()


def test_next_step_autoreset_starts_new_episodes_on_the_step_after_the_last(make_vec_env):
    env = make_vec_env(num_envs=2)
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    for _ in range(NUM_STEPS):
        obs, rewards, terminated, truncated, info = env.step(policy.predict(obs))
    assert terminated.all() and (rewards < 0).all() and info["image"].shape == (2, 16, 16, 3)
    assert info["_image"].all() and info["reward_details"]["jpeg_kb"].shape == (2,)
    obs, rewards, terminated, truncated, info = env.step(env.action_space.sample())
    assert not terminated.any() and (rewards == 0).all()
    assert float(obs["timestep"][0, 0]) == float(env.unwrapped.core.sampler.timesteps[0])


def test_same_step_autoreset_returns_the_final_observation_in_info(make_vec_env):
    env = make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP)
    assert env.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    for _ in range(NUM_STEPS):
        action = policy.predict(obs)
        obs, rewards, terminated, truncated, info = env.step(action)
    assert terminated.all()
    first_timestep = float(env.unwrapped.core.sampler.timesteps[0])
    assert (obs["timestep"][:, 0] == first_timestep).all()
    np.testing.assert_array_equal(info["final_obs"][1]["latent"], action[1])
    assert info["final_obs"][0]["timestep"][0] == -1.0
    assert info["final_info"]["image"].shape == (2, 16, 16, 3) and info["_final_obs"].all()


def test_torch_array_type_keeps_everything_on_the_device(make_vec_env):
    env = make_vec_env(num_envs=2, array_type="torch")
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    assert all(isinstance(v, torch.Tensor) and v.device == env.unwrapped.core.device for v in obs.values())
    for _ in range(NUM_STEPS):
        with torch.no_grad():
            obs, rewards, terminated, truncated, info = env.step(policy.sample(obs))
    assert isinstance(rewards, torch.Tensor) and rewards.shape == (2,) and rewards.dtype == torch.float32
    assert isinstance(terminated, torch.Tensor) and bool(terminated.all())
    assert isinstance(info["image"], torch.Tensor) and info["image"].dtype == torch.uint8


def test_numpy_and_torch_vector_envs_agree(make_vec_env):
    numpy_env = make_vec_env(num_envs=2)
    torch_env = make_vec_env(num_envs=2, array_type="torch")
    numpy_run = rollout(numpy_env, GaussianDenoisingPolicy.from_env(numpy_env), seed=11)
    torch_obs, _ = torch_env.reset(seed=11)
    np.testing.assert_array_equal(numpy_run[0][0]["latent"], torch_obs["latent"].numpy())


def test_render_shows_the_decoded_x0_prediction(make_env):
    env = make_env(render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == (16, 16, 3)
    core = env.unwrapped.core
    with torch.no_grad():
        latents = torch.from_numpy(obs["latent"])[None]
        eps = core.backend.unet(latents, core.sampler.timesteps[0], encoder_hidden_states=core.conditioning["prompt_embedding"]).sample
    alpha = core.backend.scheduler.alphas_cumprod[int(core.sampler.timesteps[0])]
    x0 = ((latents - (1 - alpha).sqrt() * eps) / alpha.sqrt()).clamp(-1, 1)  # clip_sample=True
    expected = ((x0 / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)[0].numpy()
    np.testing.assert_array_equal(frame, expected)


def test_direct_construction_matches_the_registered_defaults():
    env = DiffusionDenoiseEnv(num_inference_steps=3)
    obs, info = env.reset(seed=0)
    assert obs["latent"].shape == (3, 32, 32)  # the built-in model
    assert env.unwrapped.core.reward.name == "jpeg_compressibility"


def test_gym_make_with_no_arguments_runs_offline():
    env = gym.make("DiffusionDenoise-v0")
    obs, info = env.reset(seed=0)
    assert obs in env.observation_space and isinstance(info["prompt"], str)
    obs, reward, terminated, truncated, info = env.step(np.zeros_like(obs["latent"]))
    assert reward == 0.0 and not terminated


def test_reduced_precision_model_still_observes_float32_and_scores_in_float32(make_env):
    env = make_env(dtype=torch.bfloat16)
    core = env.unwrapped.core
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    assert core.latents.dtype == torch.bfloat16 and obs["latent"].dtype == np.float32
    with torch.no_grad():
        action, log_prob = policy.sample_with_log_prob(obs)
    assert action.dtype == torch.bfloat16
    assert log_prob.dtype == torch.float32 and bool(torch.isfinite(log_prob).all())
    obs, *_ = env.step(action[0].float().numpy())
    assert obs in env.observation_space


def test_a_ddpm_backend_is_stepped_with_its_own_ancestral_sampler(make_env):
    from diffusers import DDPMScheduler

    from diffusion_env.backends import tiny_random_denoiser
    from diffusion_env.samplers import ScheduleError

    backend = tiny_random_denoiser()
    backend.scheduler = DDPMScheduler(variance_type="fixed_large", clip_sample=True)
    env = make_env(model=backend)
    assert env.unwrapped.core.sampler.kind == "ddpm"
    policy = GaussianDenoisingPolicy.from_env(env)
    trajectory = rollout(env, policy, seed=0)
    assert len(trajectory) == NUM_STEPS + 1 and np.isfinite(trajectory[-1][1]).all()

    backend.scheduler = DDPMScheduler(variance_type="fixed_small")
    with pytest.raises(ScheduleError, match="fixed_small variance beta-tilde_t is 0 on the last step"):
        make_env(model=backend)


def test_samples_per_prompt_gives_each_prompt_to_consecutive_envs_with_their_own_noise(make_vec_env):
    envs = make_vec_env(num_envs=6, prompts="scenes_train", samples_per_prompt=3)
    obs, info = envs.reset(seed=0)
    prompts = list(info["prompt"])
    assert prompts[0:3] == [prompts[0]] * 3 and prompts[3:6] == [prompts[3]] * 3
    core = envs.unwrapped.core
    assert core.metadata[0] == core.metadata[2] and core.metadata[0] is not core.metadata[1]
    assert not np.array_equal(obs["latent"][0], obs["latent"][1])
    # Each drawn prompt is encoded once; its samples get copies of its conditioning, equal to
    # the encoding of the whole batch of prompts.
    backend = envs.unwrapped.backend
    encoded = []
    encode = backend.encode_prompts
    backend.encode_prompts = lambda batch: encoded.append(list(batch)) or encode(batch)
    obs, info = envs.reset(seed=1)
    assert encoded == [list(info["prompt"][::3])]
    for key in envs.unwrapped.conditioning_keys:
        expected = encode(list(info["prompt"]))[key].cpu().numpy()
        np.testing.assert_allclose(obs[key], expected, rtol=1e-6, atol=1e-6)
    for bad in (4, 0):
        with pytest.raises(ValueError, match="allowed: a positive int that divides num_envs"):
            make_vec_env(num_envs=6, samples_per_prompt=bad)
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match="samples_per_prompt must be an integer"):
            make_vec_env(num_envs=6, samples_per_prompt=bad)


def test_the_next_step_loop_with_the_policy_runs_through_episode_ends(make_vec_env):
    envs = make_vec_env(num_envs=2)
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    obs, _ = envs.reset(seed=0)
    ends = 0
    for _ in range(3 * (NUM_STEPS + 1)):
        obs, rewards, terminated, truncated, info = envs.step(policy.predict(obs))
        ends += int(terminated.all())
    assert ends == 3


@pytest.mark.parametrize("kind", ["single", "numpy", "torch"])
def test_observations_are_copies_of_the_state(make_env, make_vec_env, kind):
    env = make_env(render_mode="rgb_array") if kind == "single" else make_vec_env(array_type=kind, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    latent_before = env.unwrapped.core.latents.clone()
    embedding_before = env.unwrapped.core.conditioning["prompt_embedding"].clone()
    frame_before = env.render()
    obs["latent"][:] = 0
    obs["prompt_embedding"][:] = 0
    obs["timestep"][:] = 0
    assert torch.equal(env.unwrapped.core.latents, latent_before)
    assert torch.equal(env.unwrapped.core.conditioning["prompt_embedding"], embedding_before)
    np.testing.assert_array_equal(np.asarray(env.render()), np.asarray(frame_before))


def test_the_terminal_observation_in_final_obs_is_a_copy(make_vec_env):
    envs = make_vec_env(num_envs=2, autoreset_mode="SameStep")
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    obs, _ = envs.reset(seed=0)
    for _ in range(NUM_STEPS):
        obs, _, terminated, _, info = envs.step(policy.predict(obs))
    final = info["final_obs"][0]["latent"].copy()
    obs["latent"][:] = 0
    np.testing.assert_array_equal(info["final_obs"][0]["latent"], final)
