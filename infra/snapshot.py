"""Everything the roles would write and run, per host, as one JSON-able object (no network).

`deepfleet diff` takes a snapshot of the base revision (in a git worktree, with that revision's
own code) and of the working tree, and compares them. Run as `python -m infra.snapshot SPEC`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from infra.plan import plan_cluster
from infra.spec import ClusterSpec, load_spec

Snapshot = dict[str, dict[str, str]]
SECRET = "[secret]"


def take_snapshot(spec: ClusterSpec) -> Snapshot:
    """host (or `pulumi`) -> resource name -> its full content as text."""
    snapshot: Snapshot = {}
    for node_plan in plan_cluster(spec):
        resources: dict[str, str] = {}
        for role in node_plan.roles:
            for host_file in role.files:
                resources[f"file {host_file.path}"] = (
                    f"# mode {host_file.mode} {host_file.user}:{host_file.group}\n{host_file.content}"
                )
            if role.packages:
                resources[f"packages [{role.role}]"] = "\n".join(role.packages) + "\n"
            if role.services:
                resources[f"services [{role.role}]"] = "\n".join(role.services) + "\n"
            resources[f"role {role.role}"] = (
                "\n".join([f"skipped: {role.skipped}"] if role.skipped else role.summary) + "\n"
            )
        snapshot[node_plan.node.name] = resources
    for extra in (_engine_commands(spec), _pulumi_resources(spec)):
        for host, resources in extra.items():
            snapshot.setdefault(host, {}).update(resources)
    return snapshot


def _engine_commands(spec: ClusterSpec) -> Snapshot:
    try:
        from infra.sglang import launches_for_spec
    except ImportError:
        return {}
    commands: Snapshot = {}
    for launch in launches_for_spec(spec):
        host = commands.setdefault(launch.node, {})
        host[f"engine {launch.unit_name}"] = " \\\n  ".join(launch.container_args) + "\n"
    return commands


def _pulumi_resources(spec: ClusterSpec) -> Snapshot:
    """Each resource's inputs as the mocks recorded them, one property per line, so that a diff
    shows which property of which resource a change touches (e.g. `instanceType`)."""
    try:
        from infra.pulumi_graph import cluster_resources
    except ImportError:
        return {}

    resources: dict[str, str] = {}
    for record in cluster_resources(spec):
        lines = [f"parent: {record.parent}", *property_lines(record.inputs)]
        resources[f"{record.type} {record.name}"] = "\n".join(lines) + "\n"
    return {"pulumi": resources} if resources else {}  # a lab spec has no stack


def property_lines(value: Any, path: str = "") -> Iterator[str]:
    """`path: value` lines, nested keys dotted and list items indexed; secrets masked, never
    compared (their value must not reach a PR comment); multi-line strings one line per line."""
    from pulumi.runtime import rpc

    if rpc.is_rpc_secret(value):
        yield f"{path}: {SECRET}"
    elif isinstance(value, Mapping):
        if not value and path:
            yield f"{path}: {{}}"
        for key in sorted(value):
            yield from property_lines(value[key], f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        if not value:
            yield f"{path}: []"
        for index, item in enumerate(value):
            yield from property_lines(item, f"{path}[{index}]")
    elif isinstance(value, str) and "\n" in value:
        yield f"{path}: |"
        yield from (f"  {line}" for line in value.splitlines())
    else:
        # Mocks see numbers as floats (500.0): print whole ones as integers.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        yield f"{path}: {json.dumps(value)}"


def main() -> int:
    spec = load_spec(sys.argv[1])
    json.dump(take_snapshot(spec), sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
