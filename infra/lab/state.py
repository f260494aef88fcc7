"""`.lab/state.json`: what `lab up` started, so status, ssh and down need no spec.

The file is a convenience, never the only record: `lab down` also finds leftovers by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from infra.lab.plan import LabNode, LabPlan

VERSION = 1


@dataclass
class LabState:
    plan: LabPlan
    spec: str = ""
    rootfs: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    apt_cache_pid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "version": VERSION,
            "spec": self.spec,
            "name": plan.name,
            "bridge": plan.bridge,
            "host_address": str(plan.host_address),
            "network": str(plan.network),
            "models_dir": plan.models_dir,
            "models_mount": plan.models_mount,
            "lb_port": plan.lb_port,
            "rootfs": self.rootfs,
            "apt_cache_pid": self.apt_cache_pid,
            "nodes": [
                {
                    "name": n.name,
                    "address": str(n.address),
                    "groups": list(n.groups),
                    "netns": n.netns,
                    "veth": n.host_veth,
                    "pid": self.pids.get(n.name),
                }
                for n in plan.nodes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabState:
        nodes = tuple(
            LabNode(
                name=str(n["name"]),
                address=IPv4Address(n["address"]),
                groups=tuple(str(g) for g in n["groups"]),
            )
            for n in data["nodes"]
        )
        plan = LabPlan(
            name=str(data["name"]),
            bridge=str(data["bridge"]),
            host_address=IPv4Address(data["host_address"]),
            network=IPv4Network(data["network"]),
            models_dir=str(data["models_dir"]),
            nodes=nodes,
            lb_port=int(data["lb_port"]),
            models_mount=str(data["models_mount"]),
        )
        pids = {str(n["name"]): int(n["pid"]) for n in data["nodes"] if n.get("pid")}
        acng = data.get("apt_cache_pid")
        return cls(
            plan=plan,
            spec=str(data.get("spec", "")),
            rootfs=str(data.get("rootfs", "")),
            pids=pids,
            apt_cache_pid=int(acng) if acng else None,
        )


def load_state(path: Path) -> LabState | None:
    """The recorded lab, or None when the file is missing or unreadable (e.g. cut short)."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            return None
        return LabState.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save_state(path: Path, state: LabState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    # Atomic replace: an interrupted `up` leaves the old or the new file, never half of one.
    os.replace(scratch, path)
