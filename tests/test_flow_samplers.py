"""The stochastic samplers of flow-matching models: exact Gaussian steps, checked against the
papers' equations, diffusers' Euler step and float64 torch.distributions."""

import math

import gymnasium as gym
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from agents import DDPOConfig, GaussianDenoisingPolicy, batch_normalized_advantages, collect_trajectories, ddpo_update
from diffusion_env import ScheduleError
from diffusion_env.backends import PixelUNetDenoiser, tiny_random_denoiser
from diffusion_env.samplers import FlowSampler, make_sampler

STEPS = 6
NOISES = ["flow_grpo", "dance", "cps"]


def scheduler(**config):
    return FlowMatchEulerDiscreteScheduler(shift=3.0, **config)


def random_state(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)


@pytest.mark.parametrize("noise", NOISES)
def test_without_noise_every_step_is_the_schedulers_euler_step(noise):
    sampler = make_sampler(scheduler(), STEPS, noise=noise, noise_level=0.0)
    assert not bool(sampler.stochastic.any())
    reference = scheduler()
    reference.set_timesteps(STEPS)
    x, v = random_state()
    for k, t in enumerate(reference.timesteps):
        expected = reference.step(v, t, x).prev_sample
        torch.testing.assert_close(sampler.mean(x, v, torch.full((2,), k)), expected, rtol=1e-6, atol=1e-6)
        x = expected
    nearly = make_sampler(scheduler(), STEPS, noise=noise, noise_level=1e-6)
    torch.testing.assert_close(nearly.mean(*random_state(), torch.zeros(2, dtype=torch.long)),
                               sampler.mean(*random_state(), torch.zeros(2, dtype=torch.long)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noise", NOISES)
def test_log_likelihoods_equal_float64_normal_densities(noise):
    sampler = make_sampler(scheduler(), STEPS, noise=noise, noise_level=0.7)
    x, v = random_state(1)
    for k in torch.nonzero(sampler.stochastic).flatten().tolist():
        step = torch.full((2,), k)
        mean = sampler.mean(x, v, step)
        action = sampler.sample(mean, step, torch.randn_like(x))
        expected = torch.distributions.Normal(mean.double(), float(sampler.sigma[k])).log_prob(action.double()).sum(dim=(1, 2, 3))
        torch.testing.assert_close(sampler.log_prob(action, mean, step).double(), expected, rtol=1e-6, atol=1e-3)


def test_flow_grpo_follows_its_equation_9_and_handles_t_equal_one():
    a = 0.7
    sampler = make_sampler(scheduler(), STEPS, noise="flow_grpo", noise_level=a)
    sigmas = sampler.scheduler.sigmas.double()
    assert float(sigmas[0]) == 1.0  # the first step starts at t = 1, where 1 - t = 0
    x, v = random_state(2)
    for k in range(STEPS):
        t, dt = float(sigmas[k]), float(sigmas[k + 1] - sigmas[k])
        one_minus = 1 - t if t < 1 else 1 - float(sigmas[1])  # t = 1: the largest schedule value below 1
        sigma_t = a * math.sqrt(t / one_minus)
        mean = x.double() + (v.double() + sigma_t**2 / (2 * t) * (x.double() + (1 - t) * v.double())) * dt
        torch.testing.assert_close(sampler.mean(x, v, torch.full((2,), k)).double(), mean, rtol=1e-6, atol=1e-6)
        assert float(sampler.sigma[k]) == pytest.approx(sigma_t * math.sqrt(-dt), rel=1e-12)
    assert math.isfinite(float(sampler.sigma[0])) and float(sampler.sigma[0]) > 0


def test_dance_has_a_constant_noise_level_and_cps_keeps_the_interpolations_coefficients():
    dance = make_sampler(scheduler(), STEPS, noise="dance", noise_level=0.3)
    dt = (dance.scheduler.sigmas[1:] - dance.scheduler.sigmas[:-1]).double()
    torch.testing.assert_close(dance.sigma.cpu(), 0.3 * (-dt).sqrt())
    cps = make_sampler(scheduler(), STEPS, noise="cps", noise_level=0.5)
    s = cps.scheduler.sigmas[1:].double()
    std = s * math.sin(0.5 * math.pi / 2)
    torch.testing.assert_close(cps.sigma.cpu()[:-1], std[:-1])
    assert cps.stochastic.tolist() == [True] * (STEPS - 1) + [False]  # the last step, to t = 0, has no noise
    # mean = (1 - s) x0_hat + sqrt(s^2 - std^2) eps_hat: the coefficients of x0 and eps at s when v is exact.
    x0, eps = random_state(3)
    t = float(cps.scheduler.sigmas[2])
    x_t, v = (1 - t) * x0 + t * eps, eps - x0
    mean = cps.mean(x_t, v, torch.full((2,), 2))
    torch.testing.assert_close(mean.double(), (1 - s[2]) * x0.double() + (s[2] ** 2 - std[2] ** 2).sqrt() * eps.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ScheduleError, match=f"step {STEPS - 1} .* has no noise under 'cps'"):
        make_sampler(scheduler(), STEPS, noise="cps", window=(0, STEPS))


def test_the_sde_window_makes_the_other_steps_euler_steps_and_can_move():
    sampler = make_sampler(scheduler(), STEPS, noise="flow_grpo", window=(1, 3))
    assert sampler.stochastic.tolist() == [False, True, True, False, False, False]
    euler = make_sampler(scheduler(), STEPS, noise_level=0.0)
    x, v = random_state(4)
    for k in (0, 3, 5):
        step = torch.full((2,), k)
        torch.testing.assert_close(sampler.mean(x, v, step), euler.mean(x, v, step))
        assert float(sampler.log_prob(x, x, step).abs().sum()) == 0.0  # deterministic: no log-likelihood
    sampler.set_window((3, 5))
    assert sampler.stochastic.tolist() == [False, False, False, True, True, False]
    with pytest.raises(ScheduleError, match="allowed: start <= stop"):
        sampler.set_window((4, 2))


def test_the_timestep_shift_and_dynamic_shifting_are_honoured():
    sampler = make_sampler(scheduler(), STEPS)
    reference = scheduler()
    reference.set_timesteps(STEPS)
    torch.testing.assert_close(sampler.timesteps.cpu().float(), reference.timesteps)
    assert not torch.equal(sampler.timesteps.cpu().float(), torch.linspace(1000, 1000 / STEPS, STEPS))  # shifted, not uniform
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ScheduleError, match="mu= the shift of the image size"):
        make_sampler(flux, STEPS)
    shifted = make_sampler(flux, STEPS, mu=1.15)
    flux.set_timesteps(STEPS, mu=1.15)
    torch.testing.assert_close(shifted.timesteps.cpu().float(), flux.timesteps)


def test_a_flow_model_is_an_environment_whose_float_timesteps_and_log_likelihoods_the_agents_use():
    tiny = tiny_random_denoiser()
    backend = PixelUNetDenoiser(tiny.unet, scheduler(), tiny.prompt_encoder)  # the UNet's output read as a velocity
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=4, samples_per_prompt=2, model=backend, prompts=["a red circle", "two squares"],
                        num_inference_steps=4, array_type="torch", sampler_options={"noise": "flow_grpo", "noise_level": 0.7})
    assert isinstance(envs.unwrapped.sampler, FlowSampler)
    policy = GaussianDenoisingPolicy.from_env(envs, seed=0)
    trajectories = collect_trajectories(envs, policy, seed=0)
    assert bool((trajectories.timesteps.frac() != 0).any())  # float timesteps, unrounded
    samples, steps = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        recomputed = policy.log_prob(trajectories.observations(samples, steps), trajectories.actions(samples, steps))
    torch.testing.assert_close(recomputed, trajectories.log_probs[samples, steps], rtol=1e-5, atol=1e-2)
    optimizer = torch.optim.AdamW(policy.network.parameters(), lr=1e-4)
    figures = ddpo_update(policy, trajectories, batch_normalized_advantages(trajectories.rewards), optimizer,
                          DDPOConfig(minibatch_size=8), torch.Generator().manual_seed(0))
    assert all(math.isfinite(value) for value in figures.values())
