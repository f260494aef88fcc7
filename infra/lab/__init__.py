"""The lab: throwaway multi-node test hosts on one Linux machine (see docs/lab.md).

Each node is a network namespace on a private bridge plus an overlay of a cached Debian rootfs
booted by systemd-nspawn, so pyinfra reaches it over SSH exactly as it reaches production.
"""

from infra.lab.leftovers import Leftovers, find_leftovers
from infra.lab.lifecycle import NodeStatus, UpReport, down, ssh_argv, status, up
from infra.lab.paths import LabPaths
from infra.lab.plan import LabNode, LabPlan, plan_from_spec
from infra.lab.rootfs import RootfsRecipe, ensure_rootfs
from infra.lab.state import LabState, load_state
from infra.lab.system import HOST_PACKAGES, preflight, preflight_problems

__all__ = [
    "HOST_PACKAGES",
    "LabNode",
    "LabPaths",
    "LabPlan",
    "LabState",
    "Leftovers",
    "NodeStatus",
    "RootfsRecipe",
    "UpReport",
    "down",
    "ensure_rootfs",
    "find_leftovers",
    "load_state",
    "plan_from_spec",
    "preflight",
    "preflight_problems",
    "ssh_argv",
    "status",
    "up",
]
