"""Exact Gaussian reverse transitions of diffusers' stochastic samplers.

One denoising step of DDIM with ``eta > 0`` (Song et al., 2021, "Denoising Diffusion Implicit
Models") or of DDPM ancestral sampling (Ho et al., 2020, "Denoising Diffusion Probabilistic
Models") draws the next latent from an isotropic Gaussian

    x_{t-1} ~ N(mu_theta(x_t, t, c), sigma_t^2 I).

The log-likelihood and KL are :class:`~diffusion_env.samplers.base.GaussianSampler`'s; this module
computes mu and sigma. Formulas are named as in the papers, with alpha_t standing for diffusers' ``alphas_cumprod[t]`` (the DDIM paper's
alpha_t, which is the DDPM paper's alpha-bar_t).

Every per-step coefficient is indexed by the *step index* k (0 for the first, noisiest step), so
that one call can evaluate a batch that mixes samples from different timesteps, as DDPO training
does when it recomputes log-likelihoods across samples and timesteps together.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion_env.samplers.base import GaussianSampler, ScheduleError
from diffusion_env.validation import check_int

SamplerKind = Literal["ddim", "ddpm"]


class GaussianTransition(GaussianSampler):
    """The per-step Gaussian p_theta(x_{t-1} | x_t, c) of a diffusers DDIM or DDPM sampler.

    Built from a diffusers scheduler *configuration*: a private copy of the scheduler is made and
    ``set_timesteps(num_inference_steps)`` is called on it, so the caller's scheduler is untouched.
    All coefficients are precomputed once, in float64, as tensors of shape ``(K,)`` with
    ``K = num_inference_steps``, and cast to the working dtype on use.

    The mean is written as one linear form in the predicted clean sample x0_hat, the predicted
    noise eps_hat and the current latent x_t,

        mu = coef_x0[k] * x0_hat + coef_eps[k] * eps_hat + coef_xt[k] * x_t,

    which is DDIM eq. (12) (``coef_xt = 0``) or DDPM eq. (7) (``coef_eps = 0``).

    Args:
        scheduler: a ``DDIMScheduler`` or ``DDPMScheduler`` (only its config is read).
        num_inference_steps: number of denoising steps K of one episode.
        eta: DDIM's stochasticity eta in (0, 1]; must be left at 1.0 for DDPM, whose variance is
            given by the scheduler's ``variance_type``.
        device: where the coefficient tables live.

    Raises:
        ScheduleError: when sigma_t would be 0 (or not finite) at any step, which makes the
            log-likelihood infinite and the first policy-gradient update NaN, or when the
            scheduler's options are ones this exact computation does not cover.
    """

    def __init__(
        self,
        scheduler: SchedulerMixin,
        num_inference_steps: int,
        eta: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(scheduler, DDIMScheduler):
            self.kind: SamplerKind = "ddim"
        elif isinstance(scheduler, DDPMScheduler):
            self.kind = "ddpm"
        else:
            raise ScheduleError(
                f"scheduler {type(scheduler).__name__} has no exact Gaussian transition here; "
                "allowed: diffusers.DDIMScheduler (with eta > 0) or diffusers.DDPMScheduler"
            )
        max_steps = scheduler.config.num_train_timesteps
        num_inference_steps = check_int(
            "num_inference_steps", num_inference_steps, 1, max_steps, error=ScheduleError
        )
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
            raise TypeError(f"eta must be a number, got {eta!r} ({type(eta).__name__})")
        eta = float(eta)
        if not math.isfinite(eta) or eta <= 0.0:
            raise ScheduleError(
                f"eta={eta} makes the sampler deterministic (sigma_t = 0), so the policy has no "
                "log-likelihood; allowed: 0 < eta <= 1 (DDPO uses eta = 1.0)"
            )
        if eta > 1.0:
            raise ScheduleError(
                f"eta={eta} is above 1, where DDIM's sigma_t exceeds the posterior's and its mean "
                "(DDIM eq. 12) is undefined at some steps; allowed: 0 < eta <= 1"
            )
        if self.kind == "ddpm" and eta != 1.0:
            raise ScheduleError(
                f"eta={eta} was given with a DDPMScheduler, whose variance is set by its "
                "variance_type; allowed: eta = 1.0 with DDPM, or a DDIMScheduler for other eta"
            )
        if scheduler.config.get("thresholding", False):
            raise ScheduleError(
                "dynamic thresholding (thresholding=True) makes x0_hat a per-sample quantile "
                "function and is not supported; allowed: thresholding=False (clip_sample may be on)"
            )
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ScheduleError(
                f"prediction_type={scheduler.config.prediction_type!r} is not supported; allowed: "
                "'epsilon', 'v_prediction', 'sample'"
            )

        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.eta = eta
        self.prediction_type: str = scheduler.config.prediction_type
        self.clip_sample_range: float | None = (
            float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
        )

        timesteps = self.scheduler.timesteps.to(torch.long)
        if int(timesteps.max()) >= max_steps:
            raise ScheduleError(
                f"num_inference_steps={num_inference_steps} makes the first timestep "
                f"{int(timesteps.max())} (steps_offset={self.scheduler.config.get('steps_offset', 0)}), beyond "
                f"the last trained timestep {max_steps - 1}; allowed: 1 to {self._max_steps(max_steps)} steps "
                "with this scheduler"
            )
        alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        prev_timesteps = self._previous_timesteps(timesteps)
        final_alpha = self._final_alpha_cumprod()
        # alpha_t and alpha_{t-1} in the DDIM paper's notation (cumulative products).
        alpha_t = alphas_cumprod[timesteps]
        alpha_prev = torch.where(
            prev_timesteps >= 0, alphas_cumprod[prev_timesteps.clamp(min=0)], final_alpha
        )

        if self.kind == "ddim":
            # DDIM eq. (16): sigma_t(eta) = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1}).
            variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
            sigma = eta * variance.clamp(min=0.0).sqrt()
            # DDIM eq. (12): x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps_hat + sigma_t z.
            direction_sq = 1.0 - alpha_prev - sigma**2
            if bool((direction_sq < 0).any()):
                raise ScheduleError(
                    f"eta={eta} makes 1 - alpha_(t-1) - sigma_t^2 negative (DDIM eq. 12), so the "
                    "mean is undefined; allowed: 0 < eta <= 1"
                )
            coef_x0 = alpha_prev.sqrt()
            coef_eps = direction_sq.sqrt()
            coef_xt = torch.zeros_like(alpha_t)
        else:
            variance_type = self.scheduler.config.variance_type
            # DDPM eq. (7): beta_t of this (possibly strided) step and the posterior's beta-tilde_t.
            beta_t = 1.0 - alpha_t / alpha_prev
            beta_tilde = (1.0 - alpha_prev) / (1.0 - alpha_t) * beta_t
            if variance_type == "fixed_small":
                variance = beta_tilde
            elif variance_type == "fixed_large":
                variance = beta_t
            else:
                raise ScheduleError(
                    f"DDPMScheduler variance_type={variance_type!r} is not supported; allowed: "
                    "'fixed_large' (sigma_t^2 = beta_t, > 0 at every step) or 'fixed_small' "
                    "(sigma_t^2 = beta-tilde_t, which is 0 on the last step)"
                )
            sigma = variance.clamp(min=0.0).sqrt()
            # DDPM eq. (7): mu-tilde_t = sqrt(a_{t-1}) beta_t / (1 - a_t) x0 + sqrt(1 - beta_t) (1 - a_{t-1}) / (1 - a_t) x_t.
            coef_x0 = alpha_prev.sqrt() * beta_t / (1.0 - alpha_t)
            coef_eps = torch.zeros_like(alpha_t)
            coef_xt = (1.0 - beta_t).sqrt() * (1.0 - alpha_prev) / (1.0 - alpha_t)

        self._check_sigma(sigma, timesteps, prev_timesteps)

        device = torch.device(device)
        self._set_tables(timesteps, sigma, torch.ones_like(sigma, dtype=torch.bool), device)
        self.max_timestep = float(max_steps - 1)
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)
        self.alpha_t = alpha_t.to(device)
        self.coef_x0 = coef_x0.to(device)
        self.coef_eps = coef_eps.to(device)
        self.coef_xt = coef_xt.to(device)

    def _max_steps(self, num_train_timesteps: int) -> int:
        """The most inference steps whose timesteps all lie below ``num_train_timesteps``."""
        probe = type(self.scheduler).from_config(self.scheduler.config)
        for steps in range(num_train_timesteps, 0, -1):
            probe.set_timesteps(steps)
            if int(probe.timesteps.max()) < num_train_timesteps:
                return steps
        return 1

    def _previous_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.kind == "ddim":
            # DDIMScheduler.step's own rule: t_prev = t - T // K (negative on the last step).
            stride = self.scheduler.config.num_train_timesteps // self.num_inference_steps
            return timesteps - stride
        return torch.cat([timesteps[1:], torch.tensor([-1], dtype=timesteps.dtype)])

    def _final_alpha_cumprod(self) -> torch.Tensor:
        """alpha of the step after the last: DDIM's configured final alpha, 1 for DDPM."""
        if self.kind == "ddim":
            return self.scheduler.final_alpha_cumprod.to(torch.float64)
        return torch.tensor(1.0, dtype=torch.float64)

    def _check_sigma(
        self, sigma: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor
    ) -> None:
        bad = ~(torch.isfinite(sigma) & (sigma > 0))
        if not bool(bad.any()):
            return
        k = int(bad.nonzero()[0, 0])
        t, t_prev = int(timesteps[k]), int(prev_timesteps[k])
        where = f"sigma_t = {float(sigma[k]):g} at step {k} (timestep {t} -> {t_prev})"
        if self.kind == "ddpm":
            hint = (
                "DDPM's fixed_small variance beta-tilde_t is 0 on the last step, where "
                "alpha_(t-1) = 1; use variance_type='fixed_large' or a DDIMScheduler with eta > 0"
            )
        elif t_prev < 0 and self.scheduler.config.set_alpha_to_one:
            hint = (
                "the final alpha is 1 (set_alpha_to_one=True), so the last step has no noise; use "
                "set_alpha_to_one=False with steps_offset=1, as Stable Diffusion's configs do"
            )
        elif t_prev < 0:
            hint = (
                f"the last timestep is {t}, whose 'previous' alpha (final_alpha_cumprod = "
                f"alphas_cumprod[0]) equals its own; use steps_offset=1 (Stable Diffusion's "
                "setting) or timestep_spacing='trailing'"
            )
        else:
            hint = "two consecutive timesteps have the same alpha; check the beta schedule"
        raise ScheduleError(f"{where}: the log-likelihood would be infinite. Cause: {hint}.")

    # ------------------------------------------------------------------ the formulas

    def predicted_noise_and_sample(
        self, latents: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) from the network's output in its ``prediction_type``.

        DDIM eq. (9) / DDPM eq. (15): x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t), and for
        v-prediction (Salimans & Ho, 2022) v = sqrt(a_t) eps - sqrt(1 - a_t) x0. When the scheduler
        clips samples, x0_hat is clipped and eps_hat is kept, exactly as diffusers' ``step`` does.
        """
        alpha_t = self._per_sample(self.alpha_t, step_index, latents)
        sqrt_alpha, sqrt_one_minus_alpha = alpha_t.sqrt(), (1.0 - alpha_t).sqrt()
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (latents - sqrt_one_minus_alpha * eps) / sqrt_alpha
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_alpha * latents - sqrt_one_minus_alpha * model_output
            eps = sqrt_alpha * model_output + sqrt_one_minus_alpha * latents
        else:
            x0 = model_output
            eps = (latents - sqrt_alpha * x0) / sqrt_one_minus_alpha
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return eps, x0

    def mean(
        self, latents: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor
    ) -> torch.Tensor:
        """mu_theta(x_t, t, c): DDIM eq. (12) without its noise term, or DDPM eq. (7)."""
        eps, x0 = self.predicted_noise_and_sample(latents, model_output, step_index)
        return (
            self._per_sample(self.coef_x0, step_index, latents) * x0
            + self._per_sample(self.coef_eps, step_index, latents) * eps
            + self._per_sample(self.coef_xt, step_index, latents) * latents
        )

    def predicted_clean(
        self, latents: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor
    ) -> torch.Tensor:
        """x0_hat: DDIM eq. (9) (clipped as the scheduler clips it)."""
        return self.predicted_noise_and_sample(latents, model_output, step_index)[1]

    # ------------------------------------------------------------------ the denoising loss

    def training_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` training timesteps drawn uniformly from ``[0, num_train_timesteps)`` (DDPM Alg. 1)."""
        return torch.randint(self.scheduler.config.num_train_timesteps, (count,), generator=generator)

    def noisy_latents(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """DDPM eq. (4): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        return self.scheduler.add_noise(clean, noise, timesteps.to(clean.device))

    def regression_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The network's regression target in its own ``prediction_type``: eps, v (Salimans & Ho,
        2022: v = sqrt(a_t) eps - sqrt(1 - a_t) x0) or x0."""
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, timesteps.to(clean.device))
        if self.prediction_type == "sample":
            return clean
        return noise
