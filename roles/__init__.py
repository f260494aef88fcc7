"""pyinfra roles, one concern each, in the order a node gets them.

Every role module exposes:
- ``plan(spec, node) -> RolePlan | None``: pure and offline; None when the role does not concern
  that node, a `RolePlan` with ``skipped`` set when it deliberately does nothing there (the lab);
- ``apply(spec, node)``: the pyinfra ``@deploy`` that makes the host match the plan.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import PurePosixPath
from types import ModuleType

from infra.render import RolePlan
from infra.spec import ClusterSpec, Node

UNIT_SUFFIXES = (".service", ".mount", ".timer")

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


def snapshot_node(spec: ClusterSpec, node: Node, plans: dict[ModuleType, RolePlan]) -> None:
    """Ask the node once for the state of everything these roles manage (roles/_state.py)."""
    from roles._state import Probes, take_snapshot

    paths: list[str] = []
    directories: list[str] = []
    sysctls: list[str] = []
    units: list[str] = []
    images: list[str] = []
    containers: list[str] = []
    docker_info = False
    for role, role_plan in plans.items():
        paths.extend(f.path for f in role_plan.files)
        # Units the roles write are units they start.
        units.extend(
            PurePosixPath(f.path).name
            for f in role_plan.files
            if f.path.startswith("/etc/systemd/system/") and f.path.endswith(UNIT_SUFFIXES)
        )
        probes: Probes | None = getattr(role, "snapshot_probes", lambda s, n: None)(spec, node)
        if probes is not None:
            paths.extend(probes.paths)
            directories.extend(probes.directories)
            sysctls.extend(probes.sysctls)
            units.extend(probes.units)
            images.extend(probes.images)
            containers.extend(probes.containers)
            docker_info = docker_info or probes.docker_info
    take_snapshot(paths, directories, sysctls, units, images, containers, docker_info)
