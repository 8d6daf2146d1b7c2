"""Registries of the package's methods (map types, captioners, segmenters), which plugins join.

A plugin is a class registered at run time (`ipag.maps.register(MyMap)`) or installed as a Python entry point
in the registry's group, loaded when `ipag` is first imported, after the package itself (so that a plugin may
import anything from it):

    [project.entry-points."ipag.maps"]
    my_map = "my_package.my_module:MyMap"

Everything that lists methods (the page, the API, exports, the CLI, the benchmarks) reads the registry when it
runs, so a registered class is used everywhere without another change. A plugin that fails to load is logged
and skipped: it must not take the built-in methods down with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by name, in registration order: the built-in ones, then the installed plugins'."""

    def __init__(self, group: str, base: type, name_of: Callable[[T], str],
                 attach: Callable[[T], None] = lambda cls: None, detach: Callable[[T], None] = lambda cls: None) -> None:
        """`group`: the entry point group; `base`: what every class must subclass; `name_of`: its registry name;
        `attach` / `detach`: what else registering does and undoes (`attach` may refuse by raising)."""
        self.group = group
        self._base = base
        self._name_of = name_of
        self._attach = attach
        self._detach = detach
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Add `cls` (returned, so this works as a class decorator). Registering the same class again does
        nothing; another class under a taken name is refused."""
        if not (isinstance(cls, type) and issubclass(cls, self._base)):
            raise TypeError(f"{self.group} takes subclasses of {self._base.__name__}, not {cls!r}.")
        name = self._name_of(cls)
        if self._classes.get(name) is cls:
            return cls
        if name in self._classes:
            raise ValueError(f"{self.group}: the name {name!r} is taken by {self._classes[name].__qualname__}.")
        self._attach(cls)
        self._classes[name] = cls
        return cls

    def unregister(self, cls: T) -> None:
        """Remove `cls` (a test's or a notebook's plugin)."""
        name = self._name_of(cls)
        if self._classes.get(name) is not cls:
            raise ValueError(f"{self.group}: {cls.__qualname__} is not registered.")
        self._detach(self._classes.pop(name))

    def load_plugins(self) -> None:
        """Register every class installed under this registry's entry point group."""
        for entry in entry_points(group=self.group):
            try:
                self.register(entry.load())
            except Exception as err:  # noqa: BLE001 — a broken plugin must not break the package
                logger.warning("The %s plugin %r (%s) was not loaded: %s", self.group, entry.name, entry.value, err)

    def names(self) -> list[str]:
        return list(self._classes)

    def get(self, name: str) -> T | None:
        return self._classes.get(name)

    def __getitem__(self, name: str) -> T:
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._classes.values()))

    def __len__(self) -> int:
        return len(self._classes)
