"""Every bad input is refused with a message that names what is wrong and what is allowed,
and a refused step leaves the environment exactly as it was."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents import GaussianDenoisingPolicy
from diffusion_env import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv, EpisodeStateError, RewardError
from diffusion_env.samplers import ScheduleError


def snapshot(env):
    core = env.unwrapped.core
    return (
        core.latents.clone(),
        core.step_index,
        list(core.prompts),
        core.conditioning["prompt_embedding"].clone(),
        copy.deepcopy(core.generator.get_state()),
    )


def assert_unchanged(env, before):
    after = snapshot(env)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert after[1] == before[1] and after[2] == before[2]
    torch.testing.assert_close(after[3], before[3], rtol=0, atol=0)
    assert torch.equal(after[4], before[4])


def bad_actions(shape):
    good = np.zeros(shape, dtype=np.float32)
    nan, inf, big = good.copy(), good.copy(), good.copy()
    nan[0, 0, 0] = np.nan
    inf[1, 2, 3] = -np.inf
    big[0, 1, 1] = 1e6
    return [
        (good[None], ValueError, r"shape \(1, 3, 16, 16\); allowed: \(3, 16, 16\)"),
        (good[:, :8], ValueError, r"shape \(3, 8, 16\); allowed: \(3, 16, 16\)"),
        (good.astype(np.float64), TypeError, "dtype float64; allowed: float32"),
        (good.astype(np.int32), TypeError, "dtype int32; allowed: float32"),
        (good.tolist(), TypeError, "must be a numpy array"),
        (nan, ValueError, "NaN or inf"),
        (inf, ValueError, "NaN or inf"),
        (big, ValueError, r"allowed: \[-100, 100\]"),
    ]


@pytest.mark.parametrize("index", range(8))
def test_bad_actions_are_refused_and_leave_the_state_unchanged(make_env, index):
    env = make_env()
    obs, _ = env.reset(seed=0)
    env.step(np.zeros_like(obs["latent"]))  # refuse mid-episode, not only at the start
    action, error, message = bad_actions(obs["latent"].shape)[index]
    before = snapshot(env)
    with pytest.raises(error, match=message):
        env.step(action)
    assert_unchanged(env, before)


def test_after_a_refused_step_the_episode_goes_on_as_if_it_never_happened(make_env):
    env_a, env_b = make_env(), make_env()
    obs_a, _ = env_a.reset(seed=5)
    obs_b, _ = env_b.reset(seed=5)
    with pytest.raises(ValueError):
        env_a.step(np.full_like(obs_a["latent"], np.nan))
    step = np.full_like(obs_a["latent"], 0.25)
    np.testing.assert_array_equal(env_a.step(step)[0]["latent"], env_b.step(step)[0]["latent"])


def test_vector_env_refuses_bad_actions_in_both_array_types(make_vec_env):
    numpy_env = make_vec_env(num_envs=2)
    numpy_env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(3, 3, 16, 16\); allowed: \(2, 3, 16, 16\)"):
        numpy_env.step(np.zeros((3, 3, 16, 16), dtype=np.float32))
    torch_env = make_vec_env(num_envs=2, array_type="torch")
    torch_env.reset(seed=0)
    before = snapshot(torch_env)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        torch_env.step(torch.zeros((2, 3, 16, 16), dtype=torch.long))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        torch_env.step(np.zeros((2, 3, 16, 16), dtype=np.float32))
    bad = torch.zeros((2, 3, 16, 16))
    bad[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        torch_env.step(bad)
    assert_unchanged(torch_env, before)


def test_step_before_reset_is_refused(make_env, make_vec_env):
    env = make_env()
    with pytest.raises(EpisodeStateError, match=r"call reset\(\) before step\(\)"):
        env.unwrapped.step(np.zeros((3, 16, 16), dtype=np.float32))
    vector = make_vec_env()
    with pytest.raises(EpisodeStateError, match="has not been reset"):
        vector.step(np.zeros((2, 3, 16, 16), dtype=np.float32))


def test_step_after_the_episode_ended_is_refused(make_env):
    env = make_env()
    obs, _ = env.reset(seed=0)
    terminated = False
    while not terminated:
        obs, _, terminated, _, _ = env.unwrapped.step(np.zeros_like(obs["latent"]))
    before = snapshot(env)
    with pytest.raises(EpisodeStateError, match=r"episode ended after 4 steps; call reset\(\)"):
        env.unwrapped.step(np.zeros_like(obs["latent"]))
    assert_unchanged(env, before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(reward="jpeg_size"), ValueError, r"unknown reward 'jpeg_size'; allowed: \[[^\]]*'jpeg_compressibility'"),
        (dict(reward=42), TypeError, "reward must be a registered name"),
        (dict(model="stable-diffusion-9"), ValueError, r"unknown model 'stable-diffusion-9'; allowed: \[[^\]]*'tiny-random'"),
        (dict(prompts="plants"), ValueError, r"unknown prompt set 'plants'; allowed: \['animal_activities', 'animals', 'scenes_heldout', 'scenes_heldout_several', 'scenes_heldout_three', 'scenes_train', 'scenes_train_several', 'scenes_train_three'\]"),
        (dict(prompts=[]), ValueError, "one or more prompt strings"),
        (dict(eta=0.0), ScheduleError, "allowed: 0 < eta <= 1"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale=nan is not a finite number"),
        (dict(latent_bound=-1.0), ValueError, r"latent_bound=-1 is out of range; allowed: 0 < latent_bound"),
        (dict(num_inference_steps=0), ScheduleError, "allowed: an integer 1 <= num_inference_steps <= 1000"),
    ],
)
def test_bad_constructor_arguments_are_refused(make_env, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_env(**kwargs)


def test_unsupported_render_modes_are_refused():
    # gym.make turns "human" into rgb_array plus Gymnasium's HumanRendering wrapper; others are refused.
    with pytest.raises(ValueError, match=r"render_mode='ansi'; allowed: \['rgb_array'\]"):
        DiffusionDenoiseEnv(render_mode="ansi")
    with pytest.raises(ValueError, match=r"render_mode='ansi'; allowed: \['rgb_array'\]"):
        DiffusionDenoiseVectorEnv(render_mode="ansi")


def test_bad_vector_options_are_refused(make_vec_env):
    with pytest.raises(ValueError, match="autoreset_mode must be one of"):
        make_vec_env(autoreset_mode="Disabled")
    with pytest.raises(ValueError, match="array_type='jax'; allowed: 'numpy' or 'torch'"):
        make_vec_env(array_type="jax")
    with pytest.raises(ValueError, match="num_envs=0 is out of range; allowed: an integer 1 <= num_envs"):
        make_vec_env(num_envs=0)


def finish_episode(env):
    """Steps to the last transition and returns (obs before the last step, its action)."""
    obs, _ = env.reset(seed=0)
    policy = GaussianDenoisingPolicy.from_env(env)
    for _ in range(env.unwrapped.num_inference_steps - 1):
        obs, *_ = env.step(policy.predict(obs))
    return obs, policy.predict(obs)


def wrong_shape(images, prompts, metadata):
    return np.zeros(len(prompts) + 1)


def raises(images, prompts, metadata):
    raise ConnectionError("reward server unreachable")


def returns_nan(images, prompts, metadata):
    return np.full(len(prompts), np.nan)


def returns_text(images, prompts, metadata):
    return ["good"] * len(prompts)


@pytest.mark.parametrize(
    "reward, message",
    [
        (wrong_shape, r"reward 'wrong_shape' returned shape \(2,\) for 1 images; allowed: shape \(1,\)"),
        (raises, "reward 'raises' raised ConnectionError: reward server unreachable"),
        (returns_nan, "reward 'returns_nan' returned non-finite values"),
        (returns_text, r"not a sequence of numbers; allowed: an array or tensor of shape \(1,\)"),
    ],
)
def test_a_failing_reward_is_reported_and_the_last_step_can_be_retried(make_env, reward, message):
    env = make_env(reward=reward)
    obs, action = finish_episode(env)
    before = snapshot(env)
    with pytest.raises(RewardError, match=message):
        env.step(action)
    assert_unchanged(env, before)
    env.unwrapped.core.reward.fn = lambda images, prompts, metadata: np.ones(len(prompts))
    _, reward_value, terminated, _, _ = env.step(action)
    assert terminated and reward_value == 1.0


def test_policy_refuses_an_observation_without_the_expected_keys(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    with pytest.raises(KeyError, match=r"observation lacks \['timestep', 'prompt_embedding'\]"):
        policy.mean({"latent": np.zeros((3, 16, 16), dtype=np.float32)})


def test_gym_make_refuses_unknown_keyword_arguments():
    with pytest.raises(TypeError, match="num_steps"):
        gym.make("DiffusionDenoise-v0", num_steps=3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(eta=1.0001), ScheduleError, r"eta=1.0001 is above 1.*allowed: 0 < eta <= 1"),
        (dict(eta="1"), TypeError, r"eta must be a number, got '1' \(str\)"),
        (dict(num_inference_steps="2"), TypeError, r"num_inference_steps must be an integer, got '2' \(str\)"),
        (dict(num_inference_steps=2.0), TypeError, r"num_inference_steps must be an integer, got 2.0 \(float\)"),
        (dict(guidance_scale=True), TypeError, r"guidance_scale must be a number, got True \(bool\)"),
        (dict(guidance_scale="2"), TypeError, r"guidance_scale must be a number, got '2' \(str\)"),
        (dict(latent_bound="100"), TypeError, r"latent_bound must be a number"),
        (dict(device="xyz"), ValueError, r"device='xyz' is not a torch device; allowed: \['cpu'"),
        (dict(dtype="float32"), TypeError, r"dtype must be a floating-point torch.dtype"),
    ],
)
def test_strings_bools_and_out_of_range_numbers_are_refused(make_env, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_env(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_says_what_is_available(make_env):
    with pytest.raises(ValueError, match=r"no CUDA device is available on this machine; allowed: \['cpu'"):
        make_env(device="cuda")


def test_integers_of_any_integral_type_are_accepted(make_vec_env):
    envs = make_vec_env(num_envs=np.int64(2), num_inference_steps=np.int32(2), samples_per_prompt=np.int16(1))
    obs, _ = envs.reset(seed=0)
    assert envs.num_envs == 2 and isinstance(envs.num_envs, int) and obs["latent"].shape[0] == 2
    assert envs.unwrapped.num_inference_steps == 2


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_every_documented_number_of_steps_either_works_or_says_the_allowed_range(scheduler):
    from diffusers import DDPMScheduler

    from diffusion_env.backends import tiny_random_denoiser

    backend = tiny_random_denoiser()
    if scheduler == "ddpm":
        backend.scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large")
    for steps in (1, 999, 1000):
        try:
            env = DiffusionDenoiseEnv(model=backend, num_inference_steps=steps, prompts=["a"])
        except ScheduleError as error:
            # DDIM with steps_offset=1 (Stable Diffusion's setting) puts 1000 steps' first timestep at 1000.
            assert scheduler == "ddim" and steps == 1000
            assert "allowed: 1 to 999 steps with this scheduler" in str(error)
        else:
            assert env.unwrapped.num_inference_steps == steps
            assert int(env.unwrapped.sampler.timesteps.max()) <= 999


def test_a_valid_action_with_negative_strides_is_taken(make_env):
    env = make_env()
    obs, _ = env.reset(seed=0)
    action = np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)[..., ::-1] / 1000
    assert env.action_space.contains(action)
    obs, *_ = env.step(action)
    np.testing.assert_array_equal(obs["latent"], action)


def test_a_sparse_torch_action_is_refused_and_leaves_the_state_unchanged(make_vec_env):
    envs = make_vec_env(array_type="torch")
    obs, _ = envs.reset(seed=0)
    before = snapshot(envs)
    with pytest.raises(TypeError, match=r"layout torch.sparse_coo; allowed: a dense \(strided\) tensor"):
        envs.step(torch.zeros_like(obs["latent"]).to_sparse())
    assert_unchanged(envs, before)


def test_the_policy_refuses_wrong_shapes_and_unknown_timesteps(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action has shape \(3, 16, 15\); allowed: \(1, 3, 16, 16\)"):
        policy.log_prob(obs, np.zeros((3, 16, 15), dtype=np.float32))
    with pytest.raises(ValueError, match=r"observation\['latent'\] has shape \(3, 16, 15\); allowed: \(3, 16, 16\)"):
        policy.predict({**obs, "latent": np.zeros((3, 16, 15), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"observation\['prompt_embedding'\] has shape \(2, 16, 384\)"):
        policy.predict({**obs, "prompt_embedding": np.zeros((2, 16, 384), dtype=np.float32)})
    with pytest.raises(ValueError, match=r"timesteps \[nan\] are not denoising timesteps"):
        policy.predict({**obs, "timestep": np.array([np.nan], dtype=np.float32)})
    with pytest.raises(ValueError, match=r"timesteps \[5\] are not denoising timesteps"):
        policy.predict({**obs, "timestep": np.array([5.0], dtype=np.float32)})
