"""The acceptance gate: a node joins the load balancer only after it passed `deepfleet check`.

Runs at execution time (pyinfra `python.call`), right after a restarted or started replica's
engines answer /health_generate: the node's health probe (`facts.node_health.NodeHealth`, the
same script `deepfleet check` runs over SSH, without the burn-in) is judged by
`infra.check.node_ready`. A failing node fails the deploy on that host, naming its checks.
`passed()` is true only when every node of the replica passed in this run: a failed node, or one
that never got here (its engine did not answer, so pyinfra dropped the host), keeps the sglang
role's "ready" step from running, and the load_balancer role ends by draining such a replica
(`roles.sglang.hold_back_failed_replicas`; docs/monitoring.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

from pyinfra import host
from pyinfra.operations import python

from facts.node_health import NodeHealth
from infra.check import expectations, node_ready, probe_script
from infra.spec import ClusterSpec, Node

# An explicit, logged escape hatch for emergencies (and for tests on pyinfra's fake connector,
# whose hosts answer no probe): DEEPFLEET_GATE=off routes to replicas without checking them.
GATE_VARIABLE = "DEEPFLEET_GATE"

# (deployment, replica) -> the failures that keep it out of the load balancer in this run.
FAILED: dict[tuple[str, int], list[str]] = {}
# (deployment, replica) -> the nodes that passed in this run.
PASSED: dict[tuple[str, int], set[str]] = {}


class GateFailed(RuntimeError):
    pass


def gate(
    spec: ClusterSpec, node: Node, deployment: str, replica: int, condition: Callable[[], bool]
) -> None:
    """Add the gate operation for this host (the same call site on every host keeps pyinfra's
    operation order identical everywhere; hosts outside the replica never run it)."""

    def judge() -> None:
        if os.environ.get(GATE_VARIABLE) == "off":
            host.noop(f"acceptance gate disabled by {GATE_VARIABLE}=off")
            PASSED.setdefault((deployment, replica), set()).add(node.name)
            return
        script = probe_script(expectations(spec, node))
        sections = host.get_fact(NodeHealth, script=script)
        verdict = node_ready(spec, node, sections)
        if not verdict.passed:
            failures = [f"{c.name}: {c.message}" for c in verdict.failures]
            FAILED.setdefault((deployment, replica), []).extend(failures)
            raise GateFailed(
                f"{node.name} failed its acceptance checks and stays out of the load balancer: "
                + "; ".join(failures)
            )
        PASSED.setdefault((deployment, replica), set()).add(node.name)

    python.call(
        name=f"[sglang] Check {deployment} replica {replica} nodes before they serve",
        function=judge,
        _if=condition,
    )


def passed(deployment: str, replica: int, nodes: Collection[str]) -> bool:
    """Every one of the replica's NODES passed in this run (none failed, none missing)."""
    key = (deployment, replica)
    return key not in FAILED and set(nodes) <= PASSED.get(key, set())
