"""The exact Gaussian transition against independent computations: torch.distributions and diffusers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from diffusion_env.samplers import GaussianTransition, ScheduleError

SD_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1)


def ddim(**overrides):
    return DDIMScheduler(**{**SD_DDIM, "clip_sample": False, **overrides})


def test_log_prob_is_the_exact_gaussian_sum_over_dimensions():
    transition = GaussianTransition(ddim(), num_inference_steps=10, eta=1.0)
    generator = torch.Generator().manual_seed(0)
    step_index = torch.tensor([0, 3, 9, 5])  # a batch that mixes timesteps
    mean = torch.randn(4, 3, 8, 8, generator=generator)
    sigma = transition.sigma[step_index].float()
    action = mean + sigma[:, None, None, None] * torch.randn(4, 3, 8, 8, generator=generator) * 1.7

    ours = transition.log_prob(action, mean, step_index)

    reference = torch.stack(
        [Normal(mean[i], sigma[i]).log_prob(action[i]).sum() for i in range(4)]
    )
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-3)
    per_dim = transition.log_prob_per_dimension(action, mean, step_index)
    torch.testing.assert_close(per_dim, reference / (3 * 8 * 8), rtol=1e-5, atol=1e-5)


def test_log_prob_in_float64_matches_the_closed_form_to_machine_precision():
    transition = GaussianTransition(ddim(), num_inference_steps=5, eta=0.7)
    mean = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    action = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    step_index = torch.tensor([1, 4])
    sigma = transition.sigma[step_index]
    d = 4 * 4 * 4
    by_hand = (
        -((action - mean) ** 2).flatten(1).sum(1) / (2 * sigma**2)
        - d * torch.log(sigma)
        - d / 2 * math.log(2 * math.pi)
    )
    torch.testing.assert_close(transition.log_prob(action, mean, step_index), by_hand, rtol=1e-12, atol=1e-9)


def test_kl_divergence_matches_torch_distributions():
    transition = GaussianTransition(ddim(), num_inference_steps=10)
    step_index = torch.tensor([2, 7])
    mean_p, mean_q = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma = transition.sigma[step_index].float()[:, None, None, None].expand_as(mean_p)
    reference = kl_divergence(Normal(mean_p, sigma), Normal(mean_q, sigma)).flatten(1).sum(1)
    torch.testing.assert_close(transition.kl_divergence(mean_p, mean_q, step_index), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_mean_plus_noise_reproduces_diffusers_ddim_step(prediction_type, clip_sample, eta):
    scheduler = ddim(prediction_type=prediction_type, clip_sample=clip_sample)
    transition = GaussianTransition(scheduler, num_inference_steps=8, eta=eta)
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(8)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(3, 3, 8, 8, generator=generator)
    for k, t in enumerate(reference.timesteps):
        model_output = torch.randn(3, 3, 8, 8, generator=generator)
        noise = torch.randn(3, 3, 8, 8, generator=generator)
        expected = reference.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        step_index = torch.full((3,), k)
        mean = transition.mean(sample, model_output, step_index)
        ours = mean + transition.std(step_index, mean) * noise
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        sample = expected


def test_mean_plus_noise_reproduces_diffusers_ddpm_step_with_fixed_large_variance():
    scheduler = DDPMScheduler(variance_type="fixed_large", clip_sample=True)
    transition = GaussianTransition(scheduler, num_inference_steps=10)
    reference = DDPMScheduler.from_config(scheduler.config)
    reference.set_timesteps(10)
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for k, t in enumerate(reference.timesteps):
        model_output = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(100 + k))
        expected = reference.step(model_output, t, sample, generator=torch.Generator().manual_seed(k)).prev_sample
        # diffusers' DDPM adds no noise at t = 0; everywhere else it draws N(0, I) from the generator.
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(k)) if t > 0 else 0.0
        step_index = torch.full((2,), k)
        mean = transition.mean(sample, model_output, step_index)
        torch.testing.assert_close(mean + transition.std(step_index, mean) * noise if t > 0 else mean, expected, rtol=1e-5, atol=1e-5)
        sample = expected
    assert bool((transition.sigma > 0).all())


def test_ddim_sigma_follows_equation_16():
    scheduler = ddim()
    transition = GaussianTransition(scheduler, num_inference_steps=10, eta=0.5)
    a = scheduler.alphas_cumprod.double()
    t0, t1 = int(transition.timesteps[0]), int(transition.timesteps[1])
    expected = 0.5 * math.sqrt((1 - a[t1]) / (1 - a[t0]) * (1 - a[t0] / a[t1]))
    assert float(transition.sigma[0]) == pytest.approx(expected, rel=1e-12)
    # The last step goes to final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one=False).
    t_last = int(transition.timesteps[-1])
    assert t_last == 1
    expected_last = 0.5 * math.sqrt((1 - a[0]) / (1 - a[1]) * (1 - a[1] / a[0]))
    assert float(transition.sigma[-1]) == pytest.approx(expected_last, rel=1e-12)


@pytest.mark.parametrize(
    "scheduler, kwargs, message",
    [
        (ddim(), dict(eta=0.0), "eta=0.0"),
        (ddim(), dict(eta=-1.0), "eta=-1.0"),
        (ddim(), dict(eta=float("nan")), "eta=nan"),
        (ddim(), dict(eta=3.0), r"allowed: 0 < eta <= 1"),
        (ddim(steps_offset=0), dict(), "steps_offset=1"),
        (ddim(set_alpha_to_one=True), dict(), "set_alpha_to_one=False"),
        (DDPMScheduler(variance_type="fixed_small"), dict(), "fixed_large"),
        (DDPMScheduler(variance_type="learned"), dict(), "variance_type"),
        (DDPMScheduler(variance_type="fixed_large"), dict(eta=0.5), "eta = 1.0"),
        (ddim(thresholding=True), dict(), "thresholding"),
        (EulerDiscreteScheduler(), dict(), "DDIMScheduler"),
        (ddim(), dict(num_inference_steps=0), "num_inference_steps"),
        (ddim(), dict(num_inference_steps=5000), "num_inference_steps"),
    ],
)
def test_configurations_without_a_proper_gaussian_are_refused(scheduler, kwargs, message):
    kwargs = {"num_inference_steps": 10, **kwargs}
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(")):
        GaussianTransition(scheduler, **kwargs)


def test_the_diffusers_steps_offset_trap_is_refused_with_its_cause():
    # diffusers' default DDIM config: steps_offset=0 ends at timestep 0 whose "previous" alpha equals its own.
    with pytest.raises(ScheduleError) as raised:
        GaussianTransition(DDIMScheduler(set_alpha_to_one=False), num_inference_steps=20)
    assert "timestep 0" in str(raised.value) and "steps_offset=1" in str(raised.value)


def test_step_index_of_maps_timesteps_and_refuses_unknown_ones():
    transition = GaussianTransition(ddim(), num_inference_steps=4)
    timesteps = transition.timesteps.flip(0)
    assert transition.step_index_of(timesteps).tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="not denoising timesteps"):
        transition.step_index_of(torch.tensor([2]))


def test_caller_scheduler_is_left_untouched():
    scheduler = ddim()
    GaussianTransition(scheduler, num_inference_steps=7)
    assert scheduler.num_inference_steps is None
