"""pyinfra roles, one concern each, in the order a node gets them.

Every role module exposes:
- ``plan(spec, node) -> RolePlan | None``: pure, offline; None when the role has nothing to do
  on that node (a `RolePlan` with ``skipped`` says why it deliberately does nothing);
- ``apply(spec, node)``: the pyinfra ``@deploy`` that makes the host match the plan.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The order a node gets its roles in (see docs/architecture.md).
ROLE_NAMES: tuple[str, ...] = ()


def role_modules() -> list[ModuleType]:
    return [importlib.import_module(f"roles.{name}") for name in ROLE_NAMES]
