"""pyinfra roles, one concern each, in the order a node gets them.

Every role module exposes:
- ``plan(spec, node) -> RolePlan | None``: pure and offline; None when the role does not concern
  that node, a `RolePlan` with ``skipped`` set when it deliberately does nothing there (the lab);
- ``apply(spec, node)``: the pyinfra ``@deploy`` that makes the host match the plan.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# The order a node gets its roles in (docs/architecture.md explains why this order).
ROLE_NAMES: tuple[str, ...] = (
    "base",
    "timesync",
    "netplan",
    "mellanox",
    "nvidia_driver",
    "container_runtime",
    "model_storage",
    "sglang",
    "load_balancer",
    "nat",
    "monitoring",
)


def role_modules() -> list[ModuleType]:
    # Roles land one by one; tests/test_roles.py lists the ones still missing.
    return [
        importlib.import_module(f"roles.{name}")
        for name in ROLE_NAMES
        if importlib.util.find_spec(f"roles.{name}") is not None
    ]
