"""Named entries at the product's extension points (generators, victim protocols, selection
strategies, pseudo-label rules): one module and one `register` call add an entry, a config
key names it, and the config loader checks the name before any work starts."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`key` is the config key that names an entry (for messages). `instantiate`: a
    registered class is created once, without arguments. `builtins`: modules that register
    the shipped entries, imported on first use (so naming an entry imports nothing heavy)."""

    def __init__(self, key: str, *, instantiate: bool = False,
                 builtins: tuple[str, ...] = ()) -> None:
        self.key, self.instantiate, self.builtins = key, instantiate, builtins
        self.entries: dict[str, T] = {}
        self._loaded = not builtins

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: register the function, class or object under `name`; returns it."""
        def deco(entry: Any) -> Any:
            self.entries[name] = entry() if self.instantiate and isinstance(entry, type) \
                else entry
            return entry
        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.builtins:  # each registers its entries on import
                importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self.entries)

    def get(self, name: str) -> T:
        self._load()
        if name not in self.entries:
            raise ValueError(f"{self.key}: got {name!r}; expected one of: "
                             f"{', '.join(self.names())}.")
        return self.entries[name]
