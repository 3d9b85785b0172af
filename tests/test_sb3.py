"""Stable-Baselines3 steps the native vector environment through the adapter, and the single one as is;
its PPO and A2C train, save and load the diffusion policy as any SB3 policy."""

import base64
import json
import math
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.sb3 import DiffusionActorCriticPolicy, SB3VecEnvAdapter
from agents.step_window import StepWindow
from tests.conftest import NUM_STEPS

#: The policy settings that match the test environments (conftest's make_env and make_vec_env).
TEST_POLICY = {"model": "tiny-random", "num_inference_steps": NUM_STEPS}


def make_adapter(make_vec_env, **kwargs):
    return SB3VecEnvAdapter(make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP, **kwargs))


def buffer_batch(buffer):
    """A rollout buffer's observations and actions as one flat batch of tensors."""
    obs = {key: torch.as_tensor(value.reshape(-1, *value.shape[2:])) for key, value in buffer.observations.items()}
    return obs, torch.as_tensor(buffer.actions.reshape(-1, *buffer.actions.shape[2:]))


def test_adapter_follows_sb3s_autoreset_convention(make_vec_env):
    adapter = SB3VecEnvAdapter(make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP))
    adapter.seed(3)
    obs = adapter.reset()
    assert obs["latent"].shape == (2, 3, 16, 16) and len(adapter.reset_infos) == 2
    for k in range(NUM_STEPS):
        action = np.zeros((2, 3, 16, 16), dtype=np.float32) + 0.1 * k
        obs, rewards, dones, infos = adapter.step(action)
        assert dones.all() == (k == NUM_STEPS - 1)
    terminal = infos[1]["terminal_observation"]
    np.testing.assert_allclose(terminal["latent"], action[1])
    assert terminal["timestep"][0] == -1.0 and obs["timestep"][1, 0] > 0
    assert rewards.dtype == np.float32 and rewards[0] == pytest.approx(-infos[0]["reward_details"]["jpeg_kb"])
    assert infos[0]["image"].shape == (16, 16, 3) and not infos[0]["TimeLimit.truncated"]


def test_adapter_refuses_an_env_sb3_cannot_step(make_vec_env):
    with pytest.raises(ValueError, match="same-step autoreset"):
        SB3VecEnvAdapter(make_vec_env(num_envs=2))
    with pytest.raises(TypeError, match="DiffusionDenoiseVectorEnv"):
        SB3VecEnvAdapter(gym.make_vec("CartPole-v1", num_envs=2))


def test_sb3_ppo_runs_on_the_adapter_and_on_the_single_env(make_vec_env, make_env):
    adapter = SB3VecEnvAdapter(make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP))
    model = PPO("MultiInputPolicy", adapter, n_steps=NUM_STEPS, batch_size=4, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=2 * NUM_STEPS)
    assert model.num_timesteps == 2 * NUM_STEPS

    single = DummyVecEnv([lambda: make_env()])
    model = PPO("MultiInputPolicy", single, n_steps=NUM_STEPS, batch_size=4, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=NUM_STEPS)
    assert model.num_timesteps == NUM_STEPS


def test_ppo_needs_no_policy_kwargs_on_the_default_environment():
    env = DummyVecEnv([lambda: gym.make("DiffusionDenoise-v0", prompts=["a red circle on a blue background"])])
    model = PPO(DiffusionActorCriticPolicy, env, ent_coef=0.0, seed=0, device="cpu")
    actor = model.policy.actor
    assert actor.sampler.num_steps == env.get_attr("num_inference_steps")[0] == 20
    assert actor.backend.latent_shape == (3, 32, 32)
    # One step of the default environment (learning is tested on the test-sized model below).
    obs = env.reset()
    action, _ = model.predict(obs)
    assert action.shape == (1, 3, 32, 32)
    env.step(action)


@pytest.mark.parametrize("per_dimension_ratio", [False, True])
def test_sb3_ppo_with_the_diffusion_policy_updates_the_network_and_stores_exact_log_likelihoods(make_vec_env, per_dimension_ratio):
    model = PPO(DiffusionActorCriticPolicy, make_adapter(make_vec_env), n_steps=NUM_STEPS, batch_size=4, n_epochs=1,
                ent_coef=0.0, learning_rate=1e-4, seed=0, device="cpu",
                policy_kwargs={**TEST_POLICY, "per_dimension_ratio": per_dimension_ratio})
    actor = model.policy.actor
    network = actor.backend.trainable_module()
    before = [p.detach().clone() for p in network.parameters()]
    model.learn(total_timesteps=2 * NUM_STEPS)
    assert any(not torch.equal(a, b) for a, b in zip(network.parameters(), before))

    # Collect a fresh rollout without updating: SB3's stored log-likelihoods equal the policy's recomputation.
    model.rollout_buffer.reset()
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, n_rollout_steps=NUM_STEPS)
    obs, actions = buffer_batch(model.rollout_buffer)
    # With per_dimension_ratio SB3 sees log p / D, so that its ratio is DDPO's per-dimension one.
    scale = 1.0 / actions[0].numel() if per_dimension_ratio else 1.0
    with torch.no_grad():
        recomputed = actor.log_prob(obs, actions) * scale
        _, evaluated, entropy = model.policy.evaluate_actions(obs, actions)
    stored = torch.as_tensor(model.rollout_buffer.log_probs.reshape(-1))
    torch.testing.assert_close(recomputed, stored, rtol=1e-5, atol=1e-2 * scale)
    torch.testing.assert_close(evaluated, stored, rtol=1e-5, atol=1e-2 * scale)
    # D/2 (1 + log 2 pi) + D log sigma_t, divided by D with per_dimension_ratio.
    num_dims = actions[0].numel()
    expected = num_dims * (0.5 * (1 + math.log(2 * math.pi)) + torch.log(actor.std(obs))) * scale
    torch.testing.assert_close(entropy, expected)


def test_sb3_a2c_runs_with_the_diffusion_policy(make_vec_env):
    model = A2C(DiffusionActorCriticPolicy, make_adapter(make_vec_env), n_steps=NUM_STEPS, ent_coef=0.0, seed=0,
                device="cpu", policy_kwargs=dict(TEST_POLICY))  # a copy: A2C writes its RMSprop settings into it
    model.learn(total_timesteps=2 * NUM_STEPS)
    assert model.num_timesteps == 2 * NUM_STEPS


@pytest.mark.parametrize("edge", ["min_sigma", "max_sigma"])
def test_the_step_window_keeps_the_steps_outside_it_out_of_the_gradient(make_vec_env, edge):
    adapter = make_adapter(make_vec_env)
    sigma = PPO(DiffusionActorCriticPolicy, adapter, device="cpu", policy_kwargs=TEST_POLICY).policy.actor.sampler.sigma
    window = {edge: float(sigma.median())}
    model = PPO(DiffusionActorCriticPolicy, adapter, n_steps=NUM_STEPS, batch_size=2 * NUM_STEPS, seed=0, device="cpu",
                policy_kwargs={**TEST_POLICY, **window})
    actor = model.policy.actor
    _, callback = model._setup_learn(total_timesteps=NUM_STEPS)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=NUM_STEPS)
    obs, actions = buffer_batch(model.rollout_buffer)
    _, log_prob, _ = model.policy.evaluate_actions(obs, actions)
    # The values are the exact log-likelihoods at every step; only the gradient is cut.
    torch.testing.assert_close(log_prob.detach(), actor.log_prob(obs, actions).detach())
    trained = StepWindow(**window).contains(actor.sampler, actor.sampler.step_index_of(obs["timestep"]))
    assert trained.any() and not trained.all()
    for row in range(len(actions)):
        actor.zero_grad(set_to_none=True)
        _, log_prob, _ = model.policy.evaluate_actions(obs, actions)
        log_prob[row].backward()
        has_gradient = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in actor.parameters())
        assert has_gradient == bool(trained[row])

    with pytest.raises(ValueError, match="min_sigma"):
        PPO(DiffusionActorCriticPolicy, adapter, device="cpu",
            policy_kwargs={**TEST_POLICY, "min_sigma": float(sigma.max()) * 2})


def test_adam_eps_defaults_to_pytorchs_not_sb3s(make_vec_env):
    adapter = make_adapter(make_vec_env)
    default = PPO(DiffusionActorCriticPolicy, adapter, device="cpu", policy_kwargs=TEST_POLICY)
    assert default.policy.optimizer.defaults["eps"] == 1e-8  # SB3's own policies get 1e-5
    chosen = PPO(DiffusionActorCriticPolicy, adapter, device="cpu",
                 policy_kwargs={**TEST_POLICY, "optimizer_kwargs": {"eps": 1e-6}})
    assert chosen.policy.optimizer.defaults["eps"] == 1e-6


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_save_and_load_round_trip_with_plain_values_in_the_zip(make_vec_env, tmp_path, lora_rank):
    adapter = make_adapter(make_vec_env)
    policy_kwargs = {**TEST_POLICY, "lora_rank": lora_rank, "per_dimension_ratio": True}
    model = PPO(DiffusionActorCriticPolicy, adapter, n_steps=NUM_STEPS, batch_size=4, n_epochs=1, ent_coef=0.0,
                learning_rate=1e-3, seed=0, device="cpu", policy_kwargs=policy_kwargs)
    model.learn(total_timesteps=2 * NUM_STEPS)
    model.save(tmp_path / "ppo.zip")
    loaded = PPO.load(tmp_path / "ppo.zip", env=adapter, device="cpu")

    assert loaded.policy.actor.has_lora == (lora_rank > 0)
    saved, restored = model.policy.state_dict(), loaded.policy.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[key], restored[key]) for key in saved)
    adapter.seed(5)
    obs = adapter.reset()
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    set_random_seed(7)
    stochastic = model.predict(obs)[0]
    set_random_seed(7)
    np.testing.assert_array_equal(stochastic, loaded.predict(obs)[0])
    assert not np.array_equal(stochastic, model.predict(obs, deterministic=True)[0])

    # The zip holds the settings as plain values and the weights in the state dict; no model object.
    with zipfile.ZipFile(tmp_path / "ppo.zip") as archive:
        data = json.loads(archive.read("data"))
    assert data["policy_kwargs"] == policy_kwargs
    pickled = [base64.b64decode(v[":serialized:"]) for v in data.values() if isinstance(v, dict) and ":serialized:" in v]
    assert pickled and not any(b"PixelUNetDenoiser" in blob or b"UNet2DConditionModel" in blob for blob in pickled)
    parameters = model.policy._get_constructor_parameters()
    assert {key: parameters[key] for key in policy_kwargs} == policy_kwargs
    assert (parameters["min_sigma"], parameters["max_sigma"]) == (0.0, math.inf)
    assert {key.split(".")[0] for key in saved} == {"actor", "value_net"}


def test_a_policy_that_does_not_fit_the_environment_says_which_setting_to_change(make_vec_env):
    adapter = make_adapter(make_vec_env)
    with pytest.raises(ValueError, match="model 'shapes32' observes"):
        PPO(DiffusionActorCriticPolicy, adapter, device="cpu")  # the default model, on the tiny-random env
    with pytest.raises(ValueError, match="unknown model 'unknown-model'; allowed: \\["):
        PPO(DiffusionActorCriticPolicy, adapter, device="cpu", policy_kwargs={"model": "unknown-model"})
    with pytest.raises(TypeError, match="registered_name"):
        PPO(DiffusionActorCriticPolicy, adapter, device="cpu", policy_kwargs={**TEST_POLICY, "denoising_policy": None})
    other_schedule = PPO(DiffusionActorCriticPolicy, adapter, device="cpu",
                         policy_kwargs={"model": "tiny-random", "num_inference_steps": NUM_STEPS + 1})
    with pytest.raises(ValueError, match="num_inference_steps=5"):
        other_schedule.predict(adapter.reset())


def test_the_sampler_follows_the_policy_when_sb3_moves_it(make_vec_env):
    from diffusion_env.samplers import make_sampler

    policy = PPO(DiffusionActorCriticPolicy, make_adapter(make_vec_env), device="cpu", policy_kwargs=TEST_POLICY).policy
    actor = policy.actor
    # As if the policy had been built on another device than the one SB3 moves it to.
    actor.sampler = make_sampler(actor.backend.scheduler, NUM_STEPS, device="meta")
    assert policy.to("cpu") is policy
    assert actor.sampler.timesteps.device == actor.sampler.sigma.device == torch.device("cpu")
    assert actor.sampler.num_steps == NUM_STEPS


def test_sb3_ppo_trains_a_flux_model_on_the_schedule_its_back_end_declares():
    # FLUX's sigmas and mu come from the back-end (sampler_options), not from its scheduler's config.
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=2, model="tiny-flux", num_inference_steps=NUM_STEPS,
                        autoreset_mode=AutoresetMode.SAME_STEP)
    model = PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=NUM_STEPS, batch_size=2 * NUM_STEPS,
                n_epochs=1, seed=0, device="cpu", policy_kwargs={"model": "tiny-flux", "num_inference_steps": NUM_STEPS})
    torch.testing.assert_close(model.policy.actor.sampler.sigma, envs.unwrapped.sampler.sigma)
    model.learn(total_timesteps=2 * NUM_STEPS)
    assert model.num_timesteps == 2 * NUM_STEPS
