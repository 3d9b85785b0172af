"""What a sampler is to the environment and the agents: per-step Gaussian policies over the next latent.

A sampler turns the network's output at step index k (0 for the first, noisiest step) into the
distribution of the next latent. Every stochastic step is an isotropic Gaussian

    pi(x_next | x_k, c) = N(x_next; mu_k(x_k, output), sigma_k^2 I),

so its log-likelihood and the KL between two policies' steps have closed forms, computed once
here for every sampler. A step may also be deterministic (sigma_k = 0: an ODE step outside an SDE
window); it has no log-likelihood, its action is its mean, and agents do not train on it. A step
that is meant to be stochastic must have sigma_k > 0, or building the sampler raises
:class:`ScheduleError`.

Samplers import nothing of the environment: the environment and the agents import them.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

_HALF_LOG_TWO_PI = 0.5 * math.log(2.0 * math.pi)


class ScheduleError(ValueError):
    """A sampler configuration that does not define a proper Gaussian policy at every stochastic step."""


@runtime_checkable
class Sampler(Protocol):
    """The per-step policy of a diffusion sampler, indexed by step index k in ``[0, K)``.

    Attributes:
        num_steps: K, the number of denoising steps of an episode.
        timesteps: ``(K,)`` the value the network is conditioned on at each step (integers for
            DDIM/DDPM, floats for flow-matching schedulers; never rounded).
        sigma: ``(K,)`` float64, the standard deviation of each step (0 where deterministic).
        stochastic: ``(K,)`` bool, which steps are Gaussian (and so have a log-likelihood).
        init_noise_sigma: the standard deviation of the initial latent x_T.
        max_timestep: the largest timestep a network of this scheduler is conditioned on.
    """

    num_steps: int
    timesteps: torch.Tensor
    sigma: torch.Tensor
    stochastic: torch.Tensor
    init_noise_sigma: float
    max_timestep: float

    def step_index_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Step indices ``(B,)`` of the given timesteps; ``ValueError`` for one of no step."""
        ...

    def mean(self, latents: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """mu_k of the next latent ``(B, ...)`` from the network's output at step indices ``(B,)``."""
        ...

    def predicted_clean(
        self, latents: torch.Tensor, model_output: torch.Tensor, step_index: torch.Tensor
    ) -> torch.Tensor:
        """The clean sample x0 the network predicts from ``latents`` (what ``render`` shows)."""
        ...

    def std(self, step_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma_k of each sample, shaped to broadcast against ``like``."""
        ...

    def log_prob(self, next_latents: torch.Tensor, mean: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """Exact log N(next; mean, sigma_k^2 I) summed over dimensions ``(B,)``; 0 at deterministic steps."""
        ...

    def kl_divergence(self, mean_p: torch.Tensor, mean_q: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """KL between two policies' steps of the same sigma_k ``(B,)``; 0 at deterministic steps."""
        ...

    def training_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` timesteps drawn for the denoising (regression) loss."""
        ...

    def noisy_latents(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process: clean samples noised to ``timesteps``."""
        ...

    def regression_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network regresses onto at ``timesteps``: the noise, v, the velocity or x0."""
        ...


def per_dimension(log_likelihood: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """DDPO's per-dimension scaling: a log-likelihood ``(B,)`` (or a difference of two, a log
    ratio) divided by the number D of dimensions of one latent of ``latents`` ``(B, ...)``.

    DDPO's reference code averages the log-density over the latent's dimensions instead of summing
    it, so that its importance ratio is exp((log p - log p_old) / D) and its clip range (1e-4)
    refers to that ratio. Every per-dimension figure of the project is computed here.
    """
    return log_likelihood / latents[0].numel()


class GaussianSampler:
    """Shared part of every sampler: the per-step tables and the Gaussian formulas on them.

    A subclass computes its ``timesteps``, ``sigma`` and ``stochastic`` tables and calls
    :meth:`_set_tables`; it implements ``mean``, ``predicted_clean`` and the training-target
    methods of :class:`Sampler`.
    """

    num_steps: int
    timesteps: torch.Tensor
    sigma: torch.Tensor
    stochastic: torch.Tensor
    init_noise_sigma: float = 1.0
    max_timestep: float

    def _set_tables(
        self,
        timesteps: torch.Tensor,
        sigma: torch.Tensor,
        stochastic: torch.Tensor,
        device: torch.device | str,
    ) -> None:
        """Stores the ``(K,)`` tables on ``device``; a stochastic step with sigma <= 0 is refused."""
        bad = stochastic & ~(torch.isfinite(sigma) & (sigma > 0))
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ScheduleError(
                f"step {k} is meant to be stochastic but sigma = {float(sigma[k]):g}, so its "
                "log-likelihood would be infinite; allowed: sigma > 0 at every stochastic step"
            )
        device = torch.device(device)
        self.num_steps = len(timesteps)
        self.timesteps = timesteps.to(device)
        self.sigma = torch.where(stochastic, sigma, torch.zeros_like(sigma)).to(device, torch.float64)
        self.stochastic = stochastic.to(device)
        # Observations carry timesteps as float32: matching is done in float32 too.
        self._timesteps_float32 = self.timesteps.to(torch.float32)

    @property
    def device(self) -> torch.device:
        return self.timesteps.device

    def step_index_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Maps timesteps ``(B,)`` (as the observation holds them, float32) to step indices k ``(B,)``.

        Raises:
            ValueError: if a timestep is not one of this schedule's denoising timesteps.
        """
        timesteps = torch.as_tensor(timesteps, device=self.device).reshape(-1).to(torch.float32)
        matches = timesteps[:, None] == self._timesteps_float32[None, :]
        found = matches.any(dim=1)
        if not bool(found.all()):
            unknown = sorted({float(t) for t in timesteps[~found]}, key=lambda t: (math.isnan(t), t))
            shown = [int(t) if t.is_integer() else t for t in unknown]
            raise ValueError(
                f"timesteps {shown} are not denoising timesteps of this schedule; allowed: "
                f"{self.timesteps.tolist()} (-1 marks a terminal observation, where no step remains)"
            )
        return matches.to(torch.int8).argmax(dim=1)

    def stochastic_steps(self) -> torch.Tensor:
        """The step indices of the stochastic steps, ``(S,)`` long on the CPU."""
        return torch.nonzero(self.stochastic.cpu()).flatten()

    def _per_sample(self, table: torch.Tensor, step_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[step_index]`` shaped to broadcast against ``like`` (B, ...)."""
        values = table[step_index.to(table.device)].to(like.device, like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def std(self, step_index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma_k of each sample, shaped to broadcast against ``like``."""
        return self._per_sample(self.sigma, step_index, like)

    def _sigma_and_mask(self, step_index: torch.Tensor, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = step_index.to(self.device)
        stochastic = self.stochastic[index].to(device)
        # Deterministic steps get sigma 1 inside the formula and are masked out after it.
        sigma = torch.where(self.stochastic[index], self.sigma[index], torch.ones_like(self.sigma[index]))
        return sigma.to(device, dtype), stochastic

    def log_prob(self, next_latents: torch.Tensor, mean: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """Exact log N(x_next; mu, sigma_k^2 I), summed over every latent dimension: ``(B,)``.

            log p = -||x_next - mu||^2 / (2 sigma_k^2) - D log sigma_k - D/2 log(2 pi)

        Evaluated in at least float32 whatever the model's dtype, because the sum over D terms of
        a half-precision quadratic loses the few nats that policy gradients depend on.
        Deterministic steps (no density) contribute 0.
        """
        dtype = torch.promote_types(mean.dtype, torch.float32)
        diff = (next_latents.to(dtype) - mean.to(dtype)).flatten(1)
        sigma, stochastic = self._sigma_and_mask(step_index, dtype, diff.device)
        num_dims = diff.shape[1]
        log_prob = -diff.square().sum(dim=1) / (2.0 * sigma**2) - num_dims * torch.log(sigma) - num_dims * _HALF_LOG_TWO_PI
        return torch.where(stochastic, log_prob, torch.zeros_like(log_prob))

    def log_prob_per_dimension(
        self, next_latents: torch.Tensor, mean: torch.Tensor, step_index: torch.Tensor
    ) -> torch.Tensor:
        """The exact log-likelihood divided by the number of latent dimensions D: ``(B,)``.

        DDPO's reference code averages the per-dimension log-density instead of summing it; this
        is that quantity, derived from :meth:`log_prob` rather than computed a second way.
        """
        return per_dimension(self.log_prob(next_latents, mean, step_index), next_latents)

    def kl_divergence(self, mean_p: torch.Tensor, mean_q: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """KL(N(mu_p, sigma_k^2 I) || N(mu_q, sigma_k^2 I)) = ||mu_p - mu_q||^2 / (2 sigma_k^2): ``(B,)``.

        Closed form for two Gaussians with the same isotropic covariance, as DPOK regularises the
        fine-tuned policy towards the pretrained one at each step; 0 at deterministic steps.
        """
        dtype = torch.promote_types(mean_p.dtype, torch.float32)
        diff = (mean_p.to(dtype) - mean_q.to(dtype)).flatten(1)
        sigma, stochastic = self._sigma_and_mask(step_index, dtype, diff.device)
        kl = diff.square().sum(dim=1) / (2.0 * sigma**2)
        return torch.where(stochastic, kl, torch.zeros_like(kl))

    def sample(
        self, mean: torch.Tensor, step_index: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x_next = mu + sigma_k z (the mean alone at deterministic steps)."""
        return mean + self.std(step_index, mean) * noise.to(mean.device, mean.dtype)

