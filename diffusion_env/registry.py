"""Named registries: one implementation of "register a thing under a name, look it up, list the names".

The models, samplers, prompt sets and rewards each keep one :class:`Registry`; their modules add
the names users see in error messages (``unknown model 'x'; allowed: [...]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Callable entries (functions, classes, factories) under unique names.

    Args:
        kind: what an entry is, for messages ("model", "sampler", ...).
        entries: the built-in entries.
        check_name: raises ``ValueError`` for a name this registry cannot hold (beyond being a
            non-empty str).
    """

    def __init__(
        self, kind: str, entries: Mapping[str, T] | None = None, check_name: Callable[[str], None] | None = None
    ) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._check_name = check_name
        for name, entry in (entries or {}).items():
            self.register(name, entry)

    def register(self, name: str, entry: T, overwrite: bool = False) -> None:
        """Adds ``entry`` as ``name``.

        Raises:
            ValueError: if ``name`` is empty or not a str, fails the registry's name check, or is
                taken and ``overwrite`` is False.
            TypeError: if ``entry`` is not callable.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty str, got {name!r}")
        if self._check_name is not None:
            self._check_name(name)
        if not callable(entry):
            raise TypeError(f"{self.kind} {name!r} must be callable, got {type(entry).__name__}")
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Forgets ``name`` (nothing happens if it is not registered)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def for_instance(self, value: object) -> T | None:
        """The entry registered under the name of ``value``'s class or of its nearest base class
        (registries of back-ends by pipeline class, of samplers by scheduler class), or None."""
        return next((self._entries[kind.__name__] for kind in type(value).__mro__ if kind.__name__ in self._entries), None)

    def get(self, name: str, also_allowed: str = "") -> T:
        """The entry of ``name``.

        Raises:
            ValueError: for an unknown name: ``unknown <kind> <name>; allowed: [names]<also_allowed>``.
        """
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {self.names()}{also_allowed}")
        return self._entries[name]
