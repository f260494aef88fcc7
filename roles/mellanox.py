"""mellanox: DOCA-OFED for ConnectX NICs, openibd, port checks and the RoCE GID for NCCL.

Only nodes with ``rdma`` devices in the spec. DOCA-OFED comes from NVIDIA's DOCA repository at
the exact ``nvidia.doca_ofed_version`` (the version is part of the repository path, so nothing
newer can arrive by an upgrade); repository and key URLs come from the spec.

The checks read ``ibstat`` (state, rate, link layer per port) and say which node, device and
port is down or slow: the field recipes lost days to NICs not seen until reseated and to bad
optics.

RoCE GID index for NCCL: which entry of the GID table is the RoCE v2 one with the port's IPv4
address depends on the order addresses were added (3 on a plain port, 5 once a VLAN address
came first, ...). The engines read it themselves at every start (`facts.roce_gid`, installed
by the sglang role as deepfleet-nccl-env and run by each RoCE engine unit), so the value is
the node's and never a guess. This role reads the same table (`facts.rdma.RoceGids`) with the
same selection and fails the deploy, naming node and port, when no good index exists
(`roce_problems`) or when a deployment pins ``NCCL_IB_GID_INDEX`` in its ``env`` to another
index (`gid_index_problems`).

Lab: no RDMA hardware and no vendor repositories; GPU nodes get a skipped plan that still
lists what production does, and the deploy logs one line saying the role is skipped.
Ubuntu only, like nvidia_driver (`require_ubuntu`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pyinfra.api.deploy import deploy
from pyinfra.context import host
from pyinfra.facts.server import Arch, LinuxDistribution
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed

from facts.rdma import CaInfo, IbStat, RoceGids, WantedPort, port_problems
from facts.roce_gid import Gid, choose_index
from infra.render import RolePlan, render
from infra.sglang import GID_INDEX_VARIABLE, roce_ports
from infra.spec import ClusterSpec, Node
from roles import _converge as converge
from roles._apt import refresh_lists
from roles._state import Probes
from roles.nvidia_driver import (
    KEYRING_DIR,
    add_repository,
    expect,
    keyring_directory,
    report_lab_skip,
    require_ubuntu,
)

ROLE = "mellanox"
LAB_SKIP = "lab: no GPUs / no vendor repositories"
# Used when the spec leaves nvidia.doca_ofed_version unset: a DOCA LTS release that supports
# Ubuntu 22.04 and 24.04. Pin it in the spec; this default moves only with a deepfleet release.
DEFAULT_DOCA_VERSION = "2.9.1"
DOCA_KEYRING = f"{KEYRING_DIR}/doca.asc"
DOCA_SOURCE = "/etc/apt/sources.list.d/deepfleet-doca.list"
DOCA_PACKAGE = "doca-ofed"


def doca_version(spec: ClusterSpec) -> str:
    return spec.nvidia.doca_ofed_version or DEFAULT_DOCA_VERSION


def doca_distro(distribution: Mapping[str, Any]) -> str:
    """LinuxDistribution fact -> DOCA's directory name (ubuntu22.04)."""
    return f"ubuntu{distribution.get('major')}.{int(distribution.get('minor') or 0):02d}"


def doca_arch(uname_machine: str) -> str:
    return {"aarch64": "arm64-sbsa", "arm64": "arm64-sbsa"}.get(uname_machine, "x86_64")


def wanted_ports(node: Node) -> list[WantedPort]:
    return [
        WantedPort(device=d.device, port=d.port, link_layer=d.link_layer, rate_gbps=d.rate_gbps)
        for d in node.rdma
    ]


def roce_problems(node: Node, gids: Sequence[Gid]) -> list[str]:
    """What would stop NODE's engines at start: a RoCE port without a RoCE v2 IPv4 GID, or
    ports whose indexes differ. The same words deepfleet-nccl-env writes to the unit's journal,
    from the same selection (`choose_index`), so the deploy fails before an engine would."""
    ports = roce_ports(node)
    if not ports:
        return []
    _, problems = choose_index(gids, ports)
    return [f"{node.name} {problem}" for problem in problems]


def engine_gid_overrides(spec: ClusterSpec, node: Node) -> dict[str, str]:
    """NCCL_IB_GID_INDEX that deployments on NODE pin in their ``env``, by deployment. Their
    engines take it instead of the index found at start (infra/sglang.py)."""
    return {
        deployment.name: deployment.env[GID_INDEX_VARIABLE].strip()
        for deployment in spec.deployments
        if GID_INDEX_VARIABLE in deployment.env
        and any(node.name in replica for replica in deployment.replicas)
    }


def gid_index_problems(spec: ClusterSpec, node: Node, gids: Sequence[Gid]) -> list[str]:
    """Deployments whose pinned NCCL_IB_GID_INDEX is not where NODE's RoCE v2 IPv4 GID is.

    NCCL then uses whatever sits at that index (a GID on another VLAN, or a RoCE v1 entry):
    connections fail or run over the wrong network. A table without one good index is
    `roce_problems`' to report.
    """
    ports = roce_ports(node)
    index, _ = choose_index(gids, ports)
    if not ports or index is None:
        return []
    wrong = sorted(
        (name, value)
        for name, value in engine_gid_overrides(spec, node).items()
        if value != str(index)
    )
    if not wrong:
        return []
    return [
        f"{node.name}: the RoCE v2 IPv4 GID of {', '.join(map(str, ports))} is at index {index}, "
        + ", ".join(
            f"but deployment {name} pins {GID_INDEX_VARIABLE}={value}" for name, value in wrong
        )
        + "; NCCL would use the wrong GID. Fix: remove "
        + f"{GID_INDEX_VARIABLE} from "
        + ", ".join(f"deployments[{name}].env" for name, _ in wrong)
        + f' in the spec (engines then read the index at start), or set it to "{index}" '
        + f"(check with `show_gids {ports[0].device}`)"
    ]


def concerns(spec: ClusterSpec, node: Node) -> bool:
    if spec.is_lab:
        return bool(node.rdma) or node.in_group("gpu")
    return bool(node.rdma)


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    if not concerns(spec, node):
        return None
    nvidia, version = spec.nvidia, doca_version(spec)
    ports = (
        ", ".join(
            f"{d.device}/{d.port} {d.link_layer} >= {d.rate_gbps} Gb/s Active" for d in node.rdma
        )
        or "every port the spec lists under rdma:"
    )
    pinned = engine_gid_overrides(spec, node)
    gid_source = (
        "pinned by " + ", ".join(f"{name}'s env ({value})" for name, value in pinned.items())
        if pinned
        else "read from the GID table at every engine start (deepfleet-nccl-env, role sglang)"
    )
    summary = [
        f"add the DOCA repository {nvidia.doca_repository}/{version}/ubuntu<release>/<arch> "
        f"(key {nvidia.doca_key_url})",
        f"install {DOCA_PACKAGE} (DOCA {version}"
        + (
            ""
            if nvidia.doca_ofed_version
            else ", deepfleet's default: pin nvidia.doca_ofed_version"
        )
        + ")",
        "enable openibd; restart it only when the driver package changed",
        f"check ports with ibstat: {ports}",
        "RoCE: every port needs a RoCE v2 GID with an IPv4 address, at one index for all "
        f"ports; the engines' {GID_INDEX_VARIABLE} is {gid_source}",
    ]
    if spec.is_lab:
        return RolePlan(
            role=ROLE,
            summary=summary,
            packages=[DOCA_PACKAGE],
            services=["openibd"],
            skipped=LAB_SKIP,
        )
    return RolePlan(role=ROLE, summary=summary, packages=[DOCA_PACKAGE], services=["openibd"])


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(units=("openibd.service",))


@deploy("mellanox")
def apply(spec: ClusterSpec, node: Node) -> None:
    role_plan = plan(spec, node)
    if role_plan is None:
        return
    if role_plan.skipped:
        report_lab_skip(ROLE, role_plan.skipped)
        return
    distribution = host.get_fact(LinuxDistribution)
    require_ubuntu(node.name, ROLE, distribution)
    nvidia, version = spec.nvidia, doca_version(spec)
    keyring_directory(ROLE)
    repo_ops = add_repository(
        ROLE,
        nvidia.doca_key_url,
        DOCA_KEYRING,
        DOCA_SOURCE,
        render(
            "mellanox/doca.list.j2",
            keyring=DOCA_KEYRING,
            repository=nvidia.doca_repository.rstrip("/"),
            version=version,
            distro=doca_distro(distribution),
            arch=doca_arch(host.get_fact(Arch)),
        ),
        replaces=("/etc/apt/sources.list.d/doca.list",),  # NVIDIA's DOCA install guide
    )
    refresh_lists(
        f"[{ROLE}] Update apt lists after a repository change",
        condition=any_changed(*repo_ops),
    )
    driver = converge.packages(
        name=f"[{ROLE}] Install {DOCA_PACKAGE} (DOCA {version})", packages=[DOCA_PACKAGE]
    )
    converge.service(
        name=f"[{ROLE}] Enable and start openibd",
        service="openibd",
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"[{ROLE}] Restart openibd to load the new driver",
        service="openibd",
        # Restart only a running service; the operation before started it.
        running=None,
        restarted=True,
        _if=driver.did_change,
    )
    expect(
        name=f"[{ROLE}] Verify RDMA ports against the spec",
        what="RDMA check",
        problems=lambda: (
            port_problems(node.name, wanted_ports(node), _ibstat())
            + roce_problems(node, _gids())
            + gid_index_problems(spec, node, _gids())
        ),
    )


def _ibstat() -> dict[str, CaInfo]:
    return host.get_fact(IbStat)


def _gids() -> list[Gid]:
    return host.get_fact(RoceGids)


__all__ = [
    "apply",
    "engine_gid_overrides",
    "gid_index_problems",
    "plan",
    "roce_problems",
]
