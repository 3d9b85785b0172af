"""Training algorithms of the DDPO family, each one module registered by name.

- ``ddpo-is`` and ``ddpo-sf`` (:mod:`agents.algorithms.ddpo`): DDPO's importance-sampled and
  score-function policy gradients (Black et al., 2023), optionally with DPOK's KL penalty
  (Fan et al., 2023);
- ``rwr`` (:mod:`agents.algorithms.rwr`): reward-weighted regression on the denoising loss;
- ``grpo`` (:mod:`agents.algorithms.grpo`): group-relative advantages with a clipped ratio and
  a KL to the pretrained policy (Shao et al., 2024; Flow-GRPO, DanceGRPO, MixGRPO).

A new algorithm is a module defining a config dataclass and ``update(context, samples,
advantages) -> figures`` (:class:`UpdateContext`), optionally its own ``advantages(samples,
config)``, which calls :func:`register_algorithm`, and one import line below.
"""

from agents.algorithms.base import (
    AdaptersDisabledReference,
    NonFiniteError,
    ReferencePolicy,
    UpdateContext,
    make_reference,
)
from agents.algorithms.registry import (
    AdvantageFunction,
    Algorithm,
    UpdateFunction,
    available_algorithms,
    get_algorithm,
    register_algorithm,
    unregister_algorithm,
)

# The built-in algorithms register themselves on import.
from agents.algorithms import ddpo, rwr  # noqa: E402,F401  isort: skip
from agents.algorithms import grpo  # noqa: E402,F401  isort: skip

__all__ = [
    "AdaptersDisabledReference",
    "AdvantageFunction",
    "Algorithm",
    "NonFiniteError",
    "ReferencePolicy",
    "UpdateContext",
    "UpdateFunction",
    "available_algorithms",
    "get_algorithm",
    "make_reference",
    "register_algorithm",
    "unregister_algorithm",
]
