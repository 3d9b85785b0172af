"""Which denoising steps an algorithm trains on: the stochastic steps whose sigma_t lies in a window.

The gradient of log N(x; mu, sigma^2 I) with respect to mu is z / sigma_t, so the nearly
deterministic last steps of a DDIM schedule (sigma_t ~ 0.01) dominate the gradient norm with noise
(``benchmarks/gradient_by_step.py``: 78 % of it from the last 2 of 20 steps on the built-in
model); the first, noisiest steps lay out the scene, the later ones add the detail. A window
``[min_sigma, max_sigma]`` picks the steps to train on; deterministic steps (sigma = 0, no
log-likelihood) are never trained on. DDPO, RWR-free algorithms and the SB3 policy all use this
one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffusion_env.samplers import Sampler


@dataclass(frozen=True)
class StepWindow:
    """The steps with ``min_sigma <= sigma_t <= max_sigma`` among a sampler's stochastic steps.

    Attributes:
        min_sigma: steps whose sigma_t is below this are not trained on (0: none left out).
        max_sigma: steps whose sigma_t is above this are not trained on (inf: none left out).
    """

    min_sigma: float = 0.0
    max_sigma: float = math.inf

    def __post_init__(self) -> None:
        if isinstance(self.min_sigma, bool) or not self.min_sigma >= 0.0:
            raise ValueError(f"min_sigma={self.min_sigma}; allowed: >= 0")
        if isinstance(self.max_sigma, bool) or not self.max_sigma >= self.min_sigma:
            raise ValueError(f"max_sigma={self.max_sigma} < min_sigma={self.min_sigma}; allowed: max_sigma >= min_sigma")

    def mask(self, sampler: Sampler) -> torch.Tensor:
        """``(K,)`` bool on the sampler's device: which steps are trained on."""
        sigma = sampler.sigma
        return sampler.stochastic & (sigma >= self.min_sigma) & (sigma <= self.max_sigma)

    def steps(self, sampler: Sampler, num_steps: int | None = None) -> torch.Tensor:
        """The trained step indices among the first ``num_steps`` (default all), ``(S,)`` long on the CPU.

        Raises:
            ValueError: if the window holds no stochastic step (the message gives sigma's range).
        """
        mask = self.mask(sampler).cpu()[:num_steps]
        steps = torch.nonzero(mask).flatten()
        if len(steps) == 0:
            stochastic = sampler.sigma.cpu()[:num_steps][sampler.stochastic.cpu()[:num_steps]]
            span = f"[{float(stochastic.min()):.4g}, {float(stochastic.max()):.4g}]" if len(stochastic) else "(no stochastic step)"
            raise ValueError(
                f"min_sigma={self.min_sigma} and max_sigma={self.max_sigma} exclude every step (sigma_t of the "
                f"stochastic steps ranges over {span}); allowed: a window holding one of them"
            )
        return steps

    def contains(self, sampler: Sampler, step_index: torch.Tensor) -> torch.Tensor:
        """Per sample ``(B,)`` bool: whether its step index is trained on."""
        return self.mask(sampler)[step_index.to(sampler.sigma.device)].to(step_index.device)
