"""Routing: which instance gets a leg of a request.

A policy is a pipeline (``pipeline.Router``): filters drop instances that must not get
the request, a scorer rates the rest, a picker chooses one. Each policy is one module
that builds its pipeline and registers it by the name the settings use
(``PDPROXY_PREFILL_POLICY`` / ``PDPROXY_DECODE_POLICY``); ``make_router`` builds one
by name. Reading order: ``pipeline`` (the pieces), ``registry``, then one policy.
"""

from . import least_load, power_of_two, prefix_affinity, round_robin  # noqa: F401 - registers
from .pipeline import RouteContext, Router
from .registry import POLICIES, make_router

__all__ = ["POLICIES", "RouteContext", "Router", "make_router"]
