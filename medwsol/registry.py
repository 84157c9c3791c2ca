"""A small name -> object registry with did-you-mean errors.

Example:
    >>> from medwsol.registry import Registry
    >>> COLOURS = Registry("colour")
    >>> @COLOURS.register("red")
    ... def red():
    ...     return (255, 0, 0)
    >>> COLOURS.get("red")()
    (255, 0, 0)
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

from medwsol.errors import RegistryError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names fail with close matches listed.

    Args:
        kind: what the entries are ("method", "backbone", ...), used in messages.
        lazy: optional ``{name: "package.module"}``; the module is imported the
            first time the name is looked up, and is expected to register it.
            This keeps heavy imports (torch) out of ``--help`` and ``validate``.
    """

    def __init__(self, kind: str, lazy: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(lazy or {})

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an object under ``name``."""

        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise RegistryError(f"{self.kind} {name!r} is registered twice; fix: rename one of them")
            self._entries[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        """All known names, registered or lazily declared, sorted."""
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check(self, name: str) -> None:
        """Raise RegistryError when ``name`` is unknown, without importing anything."""
        if name not in self:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}; {hint + '; ' if hint else ''}"
                f"fix: use one of {', '.join(self.names())}"
            )

    def get(self, name: str) -> T:
        """Return the object registered under ``name`` (importing it if lazy)."""
        self.check(name)
        if name not in self._entries:
            importlib.import_module(self._lazy[name])
            if name not in self._entries:  # pragma: no cover - programming error
                raise RegistryError(f"module {self._lazy[name]} did not register {self.kind} {name!r}")
        return self._entries[name]
