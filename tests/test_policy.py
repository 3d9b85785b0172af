"""The reference policy: exact log-likelihoods, and rollouts that reproduce diffusers' own sampler."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Independent, Normal

from agents import GaussianDenoisingPolicy
from tests.conftest import NUM_STEPS


def diffusers_ddim_loop(backend, latents, prompts, noises, guidance_scale, eta=1.0):
    """The bare sampler: diffusers' UNet + DDIMScheduler.step, with classifier-free guidance written out."""
    scheduler = DDIMScheduler.from_config(backend.scheduler.config)
    scheduler.set_timesteps(len(noises))
    conditional = backend.encode_prompts(prompts)["prompt_embedding"]
    unconditional = backend.encode_prompts([""] * len(prompts))["prompt_embedding"]
    for t, noise in zip(scheduler.timesteps, noises):
        with torch.no_grad():
            eps_cond = backend.unet(latents, t, encoder_hidden_states=conditional).sample
            eps_uncond = backend.unet(latents, t, encoder_hidden_states=unconditional).sample
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, eta=eta, variance_noise=noise).prev_sample
    return latents


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_policy_rollout_through_the_env_reproduces_diffusers_ddim_step(make_env, guidance_scale):
    env = make_env(guidance_scale=guidance_scale)
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, info = env.reset(seed=3)
    start = torch.from_numpy(obs["latent"])[None]
    noises = torch.randn(NUM_STEPS, 1, *obs["latent"].shape, generator=torch.Generator().manual_seed(5))

    for noise in noises:
        with torch.no_grad():
            action = policy.sample(obs, noise=noise)[0].numpy()
        obs, reward, terminated, truncated, step_info = env.step(action)
    assert terminated

    backend = env.unwrapped.core.backend
    expected = diffusers_ddim_loop(backend, start, [info["prompt"]], noises, guidance_scale)
    # Guidance batches [uncond; cond] into one UNet call where the loop makes two, and w = 4
    # amplifies the float32 rounding difference over the steps: a few 1e-5 at most.
    torch.testing.assert_close(torch.from_numpy(obs["latent"])[None], expected, rtol=1e-4, atol=1e-4)
    pixel_gap = np.abs(step_info["image"].astype(int) - backend.decode(expected)[0].numpy().astype(int))
    assert pixel_gap.max() <= 1


def test_log_prob_matches_torch_normal_on_the_policy_mean(make_vec_env):
    env = make_vec_env(num_envs=3)
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(policy.predict(obs))  # a step in the middle of the chain
    action = policy.predict(obs)
    with torch.no_grad():
        ours = policy.log_prob(obs, action)
        mean = policy.mean(obs)
        sigma = policy.std(obs)
    reference = torch.stack(
        [Normal(mean[i], sigma[i]).log_prob(torch.from_numpy(action[i])).sum() for i in range(3)]
    )
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-3)


def test_distribution_is_a_diagonal_gaussian_over_the_latent(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    with torch.no_grad():
        distribution = policy.distribution(obs)
        action = distribution.sample()
        assert isinstance(distribution, Independent)
        assert distribution.event_shape == obs["latent"].shape and distribution.batch_shape == (1,)
        torch.testing.assert_close(distribution.log_prob(action), policy.log_prob(obs, action), rtol=1e-5, atol=1e-3)


def test_log_prob_batched_across_timesteps_equals_one_step_at_a_time(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=1)
    observations, actions = [], []
    for _ in range(NUM_STEPS):
        action = policy.predict(obs)
        observations.append(obs)
        actions.append(action)
        obs, *_ = env.step(action)
    batched = {key: np.stack([o[key] for o in observations]) for key in observations[0]}
    with torch.no_grad():
        together = policy.log_prob(batched, np.stack(actions))
        one_by_one = torch.cat([policy.log_prob(o, a) for o, a in zip(observations, actions)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-3)


def test_log_prob_is_differentiable_with_respect_to_the_unet(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    action = policy.predict(obs)
    policy.log_prob(obs, action).sum().backward()
    grads = [p.grad for p in env.unwrapped.core.backend.unet.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_terminal_observation_gives_the_latent_back_and_has_no_distribution(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    for _ in range(NUM_STEPS):
        obs, *_ = env.step(policy.predict(obs))
    np.testing.assert_array_equal(policy.predict(obs), obs["latent"])
    with pytest.raises(ValueError, match="the observation is terminal"):
        policy.mean(obs)


def test_from_env_refuses_other_environments():
    with pytest.raises(TypeError, match="not a DiffusionDenoise environment"):
        GaussianDenoisingPolicy.from_env(gym.make("CartPole-v1"))


def test_lora_adapters_start_at_the_pretrained_policy_and_are_all_that_trains(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    with torch.no_grad():
        before = policy.mean(obs)
    with pytest.raises(ValueError, match="allowed: an int >= 1"):
        policy.add_lora(0)
    adapters = policy.add_lora(2)
    assert adapters and all("lora" in name for name in adapters)
    assert {id(p) for p in policy.parameters() if p.requires_grad} == {id(p) for p in adapters.values()}
    with torch.no_grad():
        torch.testing.assert_close(policy.mean(obs), before, rtol=0, atol=0)
    # At the mean the gradient of log N vanishes; at a sampled (fixed) action it does not.
    with torch.no_grad():
        action = policy.sample(obs, generator=torch.Generator().manual_seed(0))
    policy.log_prob(obs, action).sum().backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in adapters.values())


def test_a_seeded_policy_gives_the_same_actions_in_any_process(make_env):
    env = make_env()
    obs, _ = env.reset(seed=0)
    first = GaussianDenoisingPolicy.from_env(env, seed=7).predict(obs)
    torch.manual_seed(123)  # the global generator does not matter to a seeded policy
    second = GaussianDenoisingPolicy.from_env(env, seed=7).predict(obs)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, GaussianDenoisingPolicy.from_env(env, seed=8).predict(obs))


def test_lora_adapters_are_drawn_from_their_seed(make_env):
    def adapters(seed):
        policy = GaussianDenoisingPolicy.from_env(make_env())
        return {name: p.detach().clone() for name, p in policy.add_lora(2, seed=seed).items()}

    torch.manual_seed(1)
    a = adapters(0)
    torch.manual_seed(2)
    b = adapters(0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = adapters(1)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)


def test_disabled_adapters_give_the_pretrained_mean_and_are_switched_back_on(make_env):
    env = make_env()
    policy = GaussianDenoisingPolicy.from_env(env)
    obs, _ = env.reset(seed=0)
    with torch.no_grad():
        pretrained = policy.mean(obs)
        for parameter in policy.add_lora(2, seed=0).values():
            parameter.add_(0.5)  # move B (and A) away from the pretrained policy
        tuned = policy.mean(obs)
        with policy.adapters_disabled():
            reference = policy.mean(obs)
        after = policy.mean(obs)
    assert torch.equal(reference, pretrained)
    assert not torch.allclose(tuned, pretrained) and torch.equal(after, tuned)
