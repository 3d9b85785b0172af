"""Stochastic samplers of flow-matching models, each step an exact Gaussian policy.

A flow-matching model (Stable Diffusion 3, FLUX; diffusers' ``FlowMatchEulerDiscreteScheduler``)
interpolates x_t = (1 - t) x_0 + t eps and predicts the velocity v = eps - x_0; its sampler is
the Euler step of the ODE dx/dt = v from t = 1 to t = 0,

    x_{t+dt} = x_t + v dt        (dt = t_next - t < 0),

which has no noise and so no log-likelihood. RL methods turn it into an SDE with the same
marginals, whose every step is Gaussian. This module implements three, each as a per-step linear
mean mu = c_x[k] x_t + c_v[k] v and a standard deviation std[k]:

- ``"flow_grpo"`` (Liu et al., 2025, "Flow-GRPO", Eq. 9-12): with the score of the interpolation,
  grad log p_t(x) = -(x + (1 - t) v) / t,

      x_{t+dt} = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt + sigma_t sqrt(|dt|) z,
      sigma_t = a sqrt(t / (1 - t)),    a = ``noise_level`` (0.7 by default).

  At t = 1 (the first step of every schedule) 1 - t = 0; there sigma_t is evaluated with
  1 - t replaced by 1 - t', t' the largest schedule value below 1 (Flow-GRPO's code does the
  same), so that the first step is a proper Gaussian with the noise level of its neighbour.
- ``"dance"`` (Xue et al., 2025, "DanceGRPO"): the same SDE with a constant noise level,
  sigma_t = a.
- ``"cps"`` (Coefficients-Preserving Sampling, Wang & Yu, 2025, Flow-GRPO's later option): with
  x0_hat = x_t - t v and eps_hat = x_t + (1 - t) v, and s = t_next,

      x_{t_next} = (1 - s) x0_hat + sqrt(s^2 - std^2) eps_hat + std z,    std = s sin(a pi / 2),

  which keeps the coefficients of x_0 and of the noise those of the interpolation at s. Its last
  step (s = 0) has no noise: it is deterministic.

Steps outside ``window = (start, stop)`` (MixGRPO, Li et al., 2025) are deterministic Euler steps;
``noise_level = 0`` makes every step one. :meth:`FlowSampler.set_window` moves the window (e.g.
between epochs). The log-likelihood and KL are the exact Gaussian ones of
:class:`~diffusion_env.samplers.base.GaussianSampler`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_env.samplers.base import GaussianSampler, ScheduleError
from diffusion_env.validation import check_float, check_int

FlowNoise = Literal["flow_grpo", "dance", "cps"]
FLOW_NOISES: tuple[str, ...] = ("flow_grpo", "dance", "cps")


class FlowSampler(GaussianSampler):
    """The SDE sampler of a ``FlowMatchEulerDiscreteScheduler`` (see the module's docstring).

    Args:
        scheduler: the model's flow-matching scheduler (only its configuration is read; its
            ``shift`` and dynamic shifting are honoured).
        num_inference_steps: K.
        device: where the per-step tables live.
        noise: ``"flow_grpo"``, ``"dance"`` or ``"cps"``.
        noise_level: a (>= 0; 0 makes every step deterministic).
        window: ``(start, stop)``: the stochastic step indices; default every step that can be
            stochastic (all but CPS's last).
        mu: the dynamic shift of FLUX-style schedulers (``use_dynamic_shifting=True``), as
            diffusers' pipelines compute it from the image size.
        sigmas: the K noise levels before the shift, for a pipeline that chooses its own (FLUX.1:
            1, ..., 1/K evenly spaced); default the scheduler's, evenly spaced timesteps.

    Raises:
        ScheduleError: for a window that holds a step without noise (CPS's last), or options out
            of range.
    """

    def __init__(
        self,
        scheduler: Any,
        num_inference_steps: int,
        device: torch.device | str = "cpu",
        noise: FlowNoise = "flow_grpo",
        noise_level: float = 0.7,
        window: tuple[int, int] | None = None,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise ScheduleError(f"scheduler {type(scheduler).__name__}; allowed: a FlowMatchEulerDiscreteScheduler")
        if noise not in FLOW_NOISES:
            raise ScheduleError(f"noise={noise!r}; allowed: {list(FLOW_NOISES)}")
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1, error=ScheduleError)
        self.noise_level = check_float("noise_level", noise_level, 0.0, error=ScheduleError)
        self.noise = noise
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if self.scheduler.config.use_dynamic_shifting and mu is None:
            raise ScheduleError("this scheduler shifts its timesteps dynamically (FLUX); allowed: mu= the shift of the image size")
        if sigmas is not None and len(sigmas) != num_inference_steps:
            raise ScheduleError(f"{len(sigmas)} sigmas for num_inference_steps={num_inference_steps}; allowed: one per step")
        self.scheduler.set_timesteps(num_inference_steps, mu=mu, sigmas=sigmas)
        sigmas = self.scheduler.sigmas.to(torch.float64)
        self.t, self.t_next = sigmas[:-1], sigmas[1:]
        self.dt = self.t_next - self.t
        self._device = torch.device(device)
        self.max_timestep = float(self.scheduler.config.num_train_timesteps)
        self.init_noise_sigma = 1.0
        self._timesteps = self.scheduler.timesteps.to(torch.float64)
        last_possible = num_inference_steps - 1 if noise == "cps" else num_inference_steps
        self.set_window(window if window is not None else (0, last_possible))

    # ------------------------------------------------------------------ the tables

    def _stochastic_coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_x, c_v, std) of every step as if it were stochastic."""
        t, t_next, dt, a = self.t, self.t_next, self.dt, self.noise_level
        if self.noise == "cps":
            std = t_next * math.sin(a * math.pi / 2)
            eps_coefficient = (t_next**2 - std**2).clamp(min=0).sqrt()
            # (1 - s) x0_hat + c_e eps_hat with x0_hat = x - t v, eps_hat = x + (1 - t) v.
            return (1 - t_next) + eps_coefficient, -(1 - t_next) * t + eps_coefficient * (1 - t), std
        if self.noise == "flow_grpo":
            # sigma_t = a sqrt(t / (1 - t)); at t = 1, 1 - t' of the largest schedule value t' < 1.
            below_one = t[t < 1]
            one_minus = torch.where(t < 1, 1 - t, 1 - (below_one.max() if len(below_one) else t.new_tensor(0.0)))
            if bool((one_minus <= 0).any()):
                raise ScheduleError("every timestep of this schedule is t = 1; allowed: num_inference_steps >= 2")
            g = a * (t / one_minus).sqrt()
        else:
            g = torch.full_like(t, a)
        # Flow-GRPO Eq. 9: x + [v + g^2 / (2t) (x + (1 - t) v)] dt + g sqrt(|dt|) z.
        c_x = 1 + g**2 * dt / (2 * t)
        c_v = dt * (1 + g**2 * (1 - t) / (2 * t))
        return c_x, c_v, g * (-dt).sqrt()

    def set_window(self, window: tuple[int, int]) -> None:
        """Makes the steps ``start <= k < stop`` stochastic and the others deterministic Euler steps.

        Raises:
            ScheduleError: for a window outside ``[0, K]`` or one that holds a step without noise.
        """
        start, stop = (check_int(name, value, 0, len(self.t), error=ScheduleError) for name, value in zip(("start", "stop"), window))
        if start > stop:
            raise ScheduleError(f"window=({start}, {stop}); allowed: start <= stop")
        steps = torch.arange(len(self.t))
        inside = (steps >= start) & (steps < stop) & torch.tensor(self.noise_level > 0)
        c_x, c_v, std = self._stochastic_coefficients()
        if bool((inside & (std <= 0)).any()):
            k = int((inside & (std <= 0)).nonzero()[0, 0])
            raise ScheduleError(
                f"step {k} (t = {float(self.t[k]):.4g} -> {float(self.t_next[k]):.4g}) has no noise under {self.noise!r}; "
                f"allowed: a window of steps with noise (CPS's last step, to t = 0, never has any)"
            )
        self.window = (start, stop)
        # Outside the window: the Euler step x + v dt (the scheduler's own step).
        self.c_x = torch.where(inside, c_x, torch.ones_like(c_x)).to(self._device)
        self.c_v = torch.where(inside, c_v, self.dt).to(self._device)
        self._set_tables(self._timesteps, std, inside, self._device)

    # ------------------------------------------------------------------ the formulas

    def mean(self, latents: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """mu_k = c_x[k] x_t + c_v[k] v (the SDE's drift step, or the Euler step outside the window)."""
        return self._per_sample(self.c_x, step_index, latents) * latents + self._per_sample(
            self.c_v, step_index, latents
        ) * model_output

    def predicted_clean(self, latents: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """x0_hat = x_t - t v."""
        return latents - self._per_sample(self.t, step_index, latents) * model_output

    # ------------------------------------------------------------------ the denoising loss

    def training_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` timesteps t * T with t ~ U(0, 1) (rectified flow's training distribution)."""
        return torch.rand(count, generator=generator, dtype=torch.float64) * self.max_timestep

    def noisy_latents(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps."""
        t = (timesteps.to(clean.device, torch.float64) / self.max_timestep).to(clean.dtype).reshape(-1, *[1] * (clean.dim() - 1))
        return (1 - t) * clean + t * noise

    def regression_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity v = eps - x_0."""
        return noise - clean
