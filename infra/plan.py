"""Offline plan of a whole cluster: which roles each node gets and every file they write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infra.render import RolePlan
from infra.spec import ClusterSpec, Node


@dataclass
class NodePlan:
    node: Node
    roles: list[RolePlan]


def plan_node(spec: ClusterSpec, node: Node) -> NodePlan:
    from roles import role_modules

    plans = [p for module in role_modules() if (p := module.plan(spec, node)) is not None]
    return NodePlan(node=node, roles=plans)


def plan_cluster(spec: ClusterSpec) -> list[NodePlan]:
    return [plan_node(spec, node) for node in spec.nodes]


def write_plan(plans: list[NodePlan], out: Path) -> list[Path]:
    """Write every rendered file under OUT/<host>/<path on the host>; return what was written."""
    written: list[Path] = []
    for node_plan in plans:
        for role in node_plan.roles:
            for host_file in role.files:
                target = out / node_plan.node.name / host_file.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(host_file.content, encoding="utf-8")
                written.append(target)
    return written
