"""Stable-Baselines3 steps the native vector environment through the adapter, and the single one as is."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.sb3 import SB3VecEnvAdapter
from tests.conftest import NUM_STEPS


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


@pytest.mark.parametrize("per_dimension_ratio", [False, True])
def test_sb3_ppo_with_the_diffusion_policy_updates_the_unet_and_stores_exact_log_likelihoods(make_vec_env, per_dimension_ratio):
    import torch

    from agents import GaussianDenoisingPolicy
    from agents.sb3 import DiffusionActorCriticPolicy

    envs = make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP)
    actor = GaussianDenoisingPolicy.from_env(envs)
    before = [p.detach().clone() for p in actor.backend.unet.parameters()]
    model = PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=NUM_STEPS, batch_size=4, n_epochs=1,
                ent_coef=0.0, learning_rate=1e-4, seed=0, device="cpu",
                policy_kwargs={"denoising_policy": actor, "per_dimension_ratio": per_dimension_ratio})
    assert model.policy.actor is actor
    model.learn(total_timesteps=2 * NUM_STEPS)
    after = list(actor.backend.unet.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))

    # Collect a fresh rollout without updating: SB3's stored log-likelihoods equal the policy's recomputation.
    model.rollout_buffer.reset()
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, n_rollout_steps=NUM_STEPS)
    buffer = model.rollout_buffer
    obs = {key: torch.as_tensor(value.reshape(-1, *value.shape[2:])) for key, value in buffer.observations.items()}
    actions = torch.as_tensor(buffer.actions.reshape(-1, *buffer.actions.shape[2:]))
    # With per_dimension_ratio SB3 sees log p / D, so that its ratio is DDPO's per-dimension one.
    scale = 1.0 / actions[0].numel() if per_dimension_ratio else 1.0
    with torch.no_grad():
        recomputed = actor.log_prob(obs, actions) * scale
        _, evaluated, entropy = model.policy.evaluate_actions(obs, actions)
    stored = torch.as_tensor(buffer.log_probs.reshape(-1))
    torch.testing.assert_close(recomputed, stored, rtol=1e-5, atol=1e-2 * scale)
    torch.testing.assert_close(evaluated, stored, rtol=1e-5, atol=1e-2 * scale)
    assert torch.isfinite(entropy).all()


def test_sb3_a2c_runs_with_the_diffusion_policy(make_vec_env):
    from stable_baselines3 import A2C

    from agents import GaussianDenoisingPolicy
    from agents.sb3 import DiffusionActorCriticPolicy

    envs = make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP)
    model = A2C(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=NUM_STEPS, ent_coef=0.0, seed=0,
                device="cpu", policy_kwargs={"denoising_policy": GaussianDenoisingPolicy.from_env(envs)})
    model.learn(total_timesteps=2 * NUM_STEPS)
    assert model.num_timesteps == 2 * NUM_STEPS


def test_min_sigma_keeps_small_sigma_steps_out_of_the_gradient(make_vec_env):
    import torch

    from agents import GaussianDenoisingPolicy
    from agents.sb3 import DiffusionActorCriticPolicy

    envs = make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP)
    actor = GaussianDenoisingPolicy.from_env(envs)
    threshold = float(actor.sampler.sigma[:NUM_STEPS].median())
    model = PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=NUM_STEPS, batch_size=2 * NUM_STEPS,
                seed=0, device="cpu", policy_kwargs={"denoising_policy": actor, "min_sigma": threshold})
    _, callback = model._setup_learn(total_timesteps=NUM_STEPS)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=NUM_STEPS)
    buffer = model.rollout_buffer
    obs = {key: torch.as_tensor(value.reshape(-1, *value.shape[2:])) for key, value in buffer.observations.items()}
    actions = torch.as_tensor(buffer.actions.reshape(-1, *buffer.actions.shape[2:]))
    _, log_prob, _ = model.policy.evaluate_actions(obs, actions)
    # The values are the exact log-likelihoods at every step; only the gradient is cut.
    torch.testing.assert_close(log_prob.detach(), actor.log_prob(obs, actions).detach())
    trained = actor.std(obs) >= threshold
    assert trained.any() and not trained.all()
    for row in range(len(actions)):
        actor.zero_grad(set_to_none=True)
        _, log_prob, _ = model.policy.evaluate_actions(obs, actions)
        log_prob[row].backward()
        has_gradient = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in actor.parameters())
        assert has_gradient == bool(trained[row])

    with pytest.raises(ValueError, match="min_sigma"):
        PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=NUM_STEPS, batch_size=2 * NUM_STEPS,
            device="cpu", policy_kwargs={"denoising_policy": actor, "min_sigma": float(actor.sampler.sigma.max()) * 2})


def test_adam_eps_defaults_to_pytorchs_not_sb3s(make_vec_env):
    from agents import GaussianDenoisingPolicy
    from agents.sb3 import DiffusionActorCriticPolicy

    envs = make_vec_env(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP)
    actor = GaussianDenoisingPolicy.from_env(envs)
    default = PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=NUM_STEPS, batch_size=2 * NUM_STEPS,
                  device="cpu",
                  policy_kwargs={"denoising_policy": actor})
    assert default.policy.optimizer.defaults["eps"] == 1e-8  # SB3's own policies get 1e-5
    chosen = PPO(DiffusionActorCriticPolicy, SB3VecEnvAdapter(envs), n_steps=NUM_STEPS, batch_size=2 * NUM_STEPS,
                 device="cpu",
                 policy_kwargs={"denoising_policy": actor, "optimizer_kwargs": {"eps": 1e-6}})
    assert chosen.policy.optimizer.defaults["eps"] == 1e-6
