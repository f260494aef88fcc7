"""The Ansible baseline's inputs, from deepfleet's own plan: the files both tools write.

`bench/fleet.py` renders every node's files with `infra.plan.plan_cluster` into
`FILES/<node>/<path on the node>` (the layout of `infra.plan.write_plan`) and writes an
inventory whose host variables list the subset `site.yml` copies from there. Both tools
therefore write byte-identical files; an Ansible run against a fleet deepfleet converged
reports no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from infra.plan import NodePlan, plan_cluster, write_plan
from infra.spec import ClusterSpec
from roles import base, container_runtime, netplan, sglang, timesync

PLAYBOOK = Path(__file__).resolve().parent / "site.yml"

# The representative subset of a deploy that the baseline repeats, by role. Files of the
# chrony group restart chrony when they change; every other file is only written.
CHRONY_PATHS = (timesync.CHRONY_CONF, timesync.CHRONY_LAB_DROPIN)
OTHER_PATHS = (
    netplan.NETPLAN_FILE,
    base.SYSCTL_PATH,
    base.LIMITS_PATH,
    container_runtime.DAEMON_JSON,
)


@dataclass(frozen=True)
class ManagedFile:
    path: str
    mode: str

    def as_var(self) -> dict[str, str]:
        # Ansible wants the mode as an octal string with a leading zero ("0644").
        return {"path": self.path, "mode": "0" + self.mode.lstrip("0").rjust(3, "0")}


@dataclass(frozen=True)
class HostFiles:
    chrony: tuple[ManagedFile, ...]
    other: tuple[ManagedFile, ...]

    @property
    def all(self) -> tuple[ManagedFile, ...]:
        return self.chrony + self.other


def _is_engine_unit(role: str, path: str) -> bool:
    return (
        role == sglang.ROLE and path.startswith(sglang.UNIT_DIR + "/") and path.endswith(".service")
    )


def subset(node_plan: NodePlan) -> HostFiles:
    """The files of one node that the baseline manages (a node has only those its roles plan)."""
    chrony: list[ManagedFile] = []
    other: list[ManagedFile] = []
    for role in node_plan.roles:
        for host_file in role.files:
            managed = ManagedFile(host_file.path, host_file.mode)
            if host_file.path in CHRONY_PATHS:
                chrony.append(managed)
            elif host_file.path in OTHER_PATHS or _is_engine_unit(role.role, host_file.path):
                other.append(managed)
    return HostFiles(tuple(chrony), tuple(other))


def inventory_data(spec: ClusterSpec, files_dir: Path, key_file: Path) -> dict[str, Any]:
    """An Ansible YAML inventory for the spec's nodes (one group `all`), with the file lists."""
    hosts: dict[str, Any] = {}
    for node_plan in plan_cluster(spec):
        node = node_plan.node
        if node.address is None:
            continue
        files = subset(node_plan)
        hosts[node.name] = {
            "ansible_host": str(node.address),
            "deepfleet_chrony_files": [f.as_var() for f in files.chrony],
            "deepfleet_files": [f.as_var() for f in files.other],
        }
    return {
        "all": {
            "vars": {
                "ansible_user": spec.site.ssh.user,
                "ansible_ssh_private_key_file": str(key_file),
                "ansible_python_interpreter": "/usr/bin/python3",
                "deepfleet_files_dir": str(files_dir),
                "deepfleet_sysctls": [
                    {"key": s.key, "value": s.value} for s in base.applied_sysctls(spec)
                ],
            },
            "hosts": hosts,
        }
    }


def write_inputs(spec: ClusterSpec, out: Path, key_file: Path) -> Path:
    """Render the files under OUT/files and the inventory as OUT/inventory.yml; return the latter."""
    files_dir = out / "files"
    write_plan(plan_cluster(spec), files_dir)
    inventory = out / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(inventory_data(spec, files_dir, key_file), sort_keys=False),
        encoding="utf-8",
    )
    return inventory
