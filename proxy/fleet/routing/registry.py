"""Policies by name: each policy module registers a factory of its pipeline here."""

from __future__ import annotations

from collections.abc import Callable

from .pipeline import Router

POLICIES: dict[str, Callable[[], Router]] = {}


def policy(name: str) -> Callable[[Callable[[], Router]], Callable[[], Router]]:
    """Register a policy's factory under ``name`` (a module-level decorator)."""

    def register(factory: Callable[[], Router]) -> Callable[[], Router]:
        if name in POLICIES:
            raise ValueError(f"routing policy {name!r} registered twice")
        POLICIES[name] = factory
        return factory

    return register


def make_router(name: str) -> Router:
    """A fresh router for a policy (each keeps its own state, e.g. a round-robin turn)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}") from None
