"""Name -> class registries with declared options, shared by the schedules and the balancers: a new schedule or
balancer is one class with a `name` and the `options` it takes.

    cls = registered(SCHEDULES, "schedule", "goodput")      # ValueError naming the choices for an unknown name
    cls(**fixed, **taken_options(cls, options))              # the options it declares, None meaning "its default"
"""
from __future__ import annotations

from typing import Mapping


def registered(registry: Mapping[str, type], what: str, name: str) -> type:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def taken_options(cls: type, options: Mapping) -> dict:
    """The entries of `options` that `cls.options` declares and that are given (not None)."""
    return {key: value for key, value in options.items() if key in cls.options and value is not None}
