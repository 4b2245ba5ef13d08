"""Name → implementation tables of the interchangeable strategies, read by config validation, ``quantize()``
and the command line alike.

The tables are filled where the strategies are defined (``post_ln``, ``mixed_precision``, ``importance``, the
softmax and GELU quantizers in ``nn``, the weight roundings in ``rounding``), each implementation registering
itself under its name; this module only holds the tables, so that the config can validate names without importing
the machinery behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["ALLOCATION_RULES", "GELU_QUANTIZERS", "IMPORTANCE_CRITERIA", "POST_LN_TREATMENTS", "Registry",
           "SOFTMAX_QUANTIZERS", "WEIGHT_ROUNDINGS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered ``{name: entry}`` table for one kind of strategy (e.g. ``"importance"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the decorated entry under ``name``; ValueError if the name is taken."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered.")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> T:
        """Remove and return the entry registered as ``name`` (for plugins and tests that add their own)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; ValueError naming the valid names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.kind} must be one of {self.names()}, got {name!r}.") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


POST_LN_TREATMENTS: Registry = Registry("post_ln")
ALLOCATION_RULES: Registry = Registry("allocation")
IMPORTANCE_CRITERIA: Registry = Registry("importance")
SOFTMAX_QUANTIZERS: Registry = Registry("softmax_quantizer")
GELU_QUANTIZERS: Registry = Registry("gelu_quantizer")
WEIGHT_ROUNDINGS: Registry = Registry("weight_rounding")
