"""The register of training algorithms: a name, its config class and its update function.

    register_algorithm("ddpo-is", DDPOConfig, update_ddpo, fixed={"estimator": "is"}, ...)

The training command (:mod:`agents.train`) finds everything about an algorithm here: its config
fields become the ``[algorithm]`` table of a config file and command-line flags, and its update
trains one epoch; an algorithm that needs other advantages than the command's (GRPO's group
statistics) registers its own. A new algorithm is one module that calls :func:`register_algorithm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from agents.algorithms.base import UpdateContext
from agents.rollouts import Outcomes, Trajectories

UpdateFunction = Callable[[UpdateContext, Trajectories, torch.Tensor], dict[str, float]]
#: ``advantages(outcomes, config) -> (B,)``: an algorithm's own advantages from the outcomes of an
#: epoch's samples (rewards, groups, prompts: of all processes in a data-parallel run) and its
#: config (e.g. GRPO's, relative to each sample's group).
AdvantageFunction = Callable[[Outcomes, Any], torch.Tensor]


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    Attributes:
        name: the name a config file's ``[algorithm] name`` gives.
        config_class: a dataclass of the algorithm's hyper-parameters, each field with a default
            and a ``metadata={"help": ...}`` (optionally ``"flag"``: the command-line flag's name).
        update: trains the policy on one epoch: ``update(context, samples, advantages) -> figures``.
        fixed: config fields that the name sets (e.g. DDPO's estimator); they cannot be configured.
        uses_reference: whether a config needs the pretrained policy (a KL penalty).
        description: one line for ``--help``.
        advantages: the algorithm's own advantages ``advantages(outcomes, config) -> (B,)`` (an
            :class:`~agents.rollouts.Outcomes`; a ``Trajectories`` has the same fields); None:
            the training command's (per-prompt statistics or the batch's, ``[advantages]``).
    """

    name: str
    config_class: type
    update: UpdateFunction
    fixed: Mapping[str, Any] = field(default_factory=dict)
    uses_reference: Callable[[Any], bool] = lambda config: False
    description: str = ""
    advantages: AdvantageFunction | None = None

    def fields(self) -> list[dataclasses.Field]:
        """The configurable fields of the algorithm's config (those the name does not fix)."""
        return [f for f in dataclasses.fields(self.config_class) if f.name not in self.fixed]

    def make_config(self, values: Mapping[str, Any] | None = None) -> Any:
        """The algorithm's config from ``values`` (field name -> value; the others keep their defaults).

        Raises:
            ValueError: for a key that is no configurable field (the message lists them), or a value
                the config class refuses.
        """
        values = dict(values or {})
        allowed = [f.name for f in self.fields()]
        unknown = [key for key in values if key not in allowed]
        if unknown:
            raise ValueError(f"algorithm {self.name!r} has no setting {unknown[0]!r}; allowed: {allowed}")
        return self.config_class(**values, **self.fixed)


_ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(
    name: str,
    config_class: type,
    update: UpdateFunction,
    *,
    fixed: Mapping[str, Any] | None = None,
    uses_reference: Callable[[Any], bool] | None = None,
    description: str = "",
    advantages: AdvantageFunction | None = None,
    overwrite: bool = False,
) -> Algorithm:
    """Makes an algorithm available as ``[algorithm] name = "NAME"`` (and ``--algorithm NAME``).

    Raises:
        ValueError: if ``name`` is taken (and ``overwrite`` is False) or empty, or ``fixed`` names
            no field of ``config_class``.
        TypeError: if ``config_class`` is not a dataclass, or ``update`` (or ``advantages``, when
            given) is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an algorithm name must be a non-empty str, got {name!r}")
    if name in _ALGORITHMS and not overwrite:
        raise ValueError(f"algorithm {name!r} is already registered; pass overwrite=True to replace it")
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"the config class of algorithm {name!r} must be a dataclass, got {config_class!r}")
    if not callable(update):
        raise TypeError(f"the update of algorithm {name!r} must be callable, got {type(update).__name__}")
    if advantages is not None and not callable(advantages):
        raise TypeError(f"the advantages of algorithm {name!r} must be callable or None, got {type(advantages).__name__}")
    fixed = dict(fixed or {})
    names = {f.name for f in dataclasses.fields(config_class)}
    if set(fixed) - names:
        raise ValueError(f"fixed={fixed} names no field of {config_class.__name__}; allowed: {sorted(names)}")
    algorithm = Algorithm(
        name, config_class, update, fixed, uses_reference or (lambda config: False), description, advantages
    )
    _ALGORITHMS[name] = algorithm
    return algorithm


def unregister_algorithm(name: str) -> None:
    """Removes a registered algorithm (e.g. one a test registered)."""
    get_algorithm(name)
    del _ALGORITHMS[name]


def available_algorithms() -> list[str]:
    """The registered algorithm names, in registration order."""
    return list(_ALGORITHMS)


def get_algorithm(name: str) -> Algorithm:
    """The registered algorithm ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones).
    """
    if name not in _ALGORITHMS:
        raise ValueError(f"algorithm={name!r}; allowed: {available_algorithms()}")
    return _ALGORITHMS[name]
