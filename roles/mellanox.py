"""mellanox: DOCA-OFED for ConnectX NICs, openibd, port checks and the RoCE GID for NCCL.

Only nodes with ``rdma`` devices in the spec. DOCA-OFED comes from NVIDIA's DOCA repository at
the exact ``nvidia.doca_ofed_version`` (the version is part of the repository path, so nothing
newer can arrive by an upgrade); repository and key URLs come from the spec.

The checks read ``ibstat`` (state, rate, link layer per port) and say which node, device and
port is down or slow: the field recipes lost days to NICs not seen until reseated and to bad
optics. For the serving role, `nccl_ib_env` turns the RoCE GID table (`facts.rdma.RoceGids`)
into ``NCCL_IB_HCA`` and ``NCCL_IB_GID_INDEX``.

The engines do not read that table yet: infra/sglang.py gives them ``NCCL_IB_GID_INDEX`` =
``ROCE_V2_GID_INDEX`` (3) unless a deployment's ``env`` says otherwise. With an address on a
second netdev (a VLAN on the bond) the RoCE v2 IPv4 entry moves (to 5, say) and NCCL would use
the wrong GID, so the port check fails when the index found on the node differs from the one
the node's engines get (`gid_index_problems`), and says which ``env`` to set.

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

from facts.rdma import CaInfo, Gid, IbStat, RoceGids, WantedPort, nccl_gid_index, port_problems
from infra.render import RolePlan, render
from infra.sglang import ROCE_V2_GID_INDEX
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
# Where nothing better is known offline: on mlx5 with an IPv4 address, index 3 is the RoCE v2
# IPv4-mapped entry (0/1: link-local v1/v2, 2/3: IPv4 v1/v2). The fact decides on the node.
# The engines' value (infra/sglang.py), so that the offline env and the engines agree.
DEFAULT_ROCE_GID_INDEX = int(ROCE_V2_GID_INDEX)
GID_INDEX_VARIABLE = "NCCL_IB_GID_INDEX"


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
    """Ethernet (RoCE) ports without a RoCE v2 IPv4 GID: NCCL would have no index to use."""
    found = []
    for device in node.rdma:
        if device.link_layer != "ethernet":
            continue
        if nccl_gid_index(gids, device.device, device.port, device.interface) is None:
            found.append(
                f"{node.name} {device.device} port {device.port}: no RoCE v2 GID with an IPv4 "
                f"address (is {device.interface or 'its netdev'} up with its address? netplan)"
            )
    return found


def engine_gid_indexes(spec: ClusterSpec, node: Node) -> dict[str, str]:
    """NCCL_IB_GID_INDEX of the engines NODE runs, by deployment, as infra/sglang.py sets it:
    ``ROCE_V2_GID_INDEX`` unless the deployment's ``env`` names another value.

    A node outside every deployment maps "" to the default: the value any deployment placed
    there later would get. (tests/test_gpu_stack.py compares this with the engines' env.)
    """
    indexes = {
        deployment.name: deployment.env.get(GID_INDEX_VARIABLE, ROCE_V2_GID_INDEX).strip()
        for deployment in spec.deployments
        if any(node.name in replica for replica in deployment.replicas)
    }
    return indexes or {"": ROCE_V2_GID_INDEX}


def gid_index_problems(spec: ClusterSpec, node: Node, gids: Sequence[Gid]) -> list[str]:
    """RoCE ports whose RoCE v2 IPv4 GID is not at the index NODE's engines give NCCL.

    NCCL then uses whatever sits at that index (a GID on another VLAN, or a RoCE v1 entry):
    connections fail or run over the wrong network. Ports without such a GID are left to
    `roce_problems`.
    """
    found_at = {
        (d.device, d.port, d.interface): index
        for d in node.rdma
        if d.link_layer == "ethernet"
        and (index := nccl_gid_index(gids, d.device, d.port, d.interface)) is not None
    }
    engines = engine_gid_indexes(spec, node)
    found: list[str] = []
    for (device, port, interface), index in found_at.items():
        wrong = sorted((name, value) for name, value in engines.items() if value != str(index))
        if not wrong:
            continue
        users = ", ".join(
            f"deployment {name} uses {GID_INDEX_VARIABLE}={value}"
            if name
            else f"deepfleet's default for engines is {GID_INDEX_VARIABLE}={value}"
            for name, value in wrong
        )
        where = ", ".join(f"deployments[{name}].env" for name, _ in wrong if name) or (
            "the env of every deployment you place on this node"
        )
        found.append(
            f"{node.name} {device} port {port}: the RoCE v2 IPv4 GID is at index {index}"
            f"{f' (on {interface})' if interface else ''}, but {users}; NCCL would use the "
            f'wrong GID. Fix: set {GID_INDEX_VARIABLE}: "{index}" in {where} in the spec '
            f"(check with `show_gids {device}`)"
        )
    if len(set(found_at.values())) > 1:
        found.append(
            f"{node.name}: the RoCE v2 IPv4 GID indexes differ between ports ("
            + ", ".join(
                f"{d}/{p} {i}"
                for (d, p, _), i in sorted(found_at.items(), key=lambda item: item[0][:2])
            )
            + f") and {GID_INDEX_VARIABLE} takes one value: give every RoCE netdev its "
            "addresses in the same order (netplan)"
        )
    return found


def nccl_ib_env(node: Node, gids: Sequence[Gid] | None = None) -> dict[str, str]:
    """NCCL settings for NODE's RDMA ports, for the serving role's container environment.

    ``gids`` is ``host.get_fact(RoceGids)`` on the node; without it (offline plans) the GID
    index is the mlx5 default. Raises ValueError when the RoCE ports disagree on the index
    (NCCL takes one value) or when a RoCE port has none.
    """
    if not node.rdma:
        return {}
    # "=" makes NCCL match the names exactly (mlx5_1 would otherwise also pick mlx5_10..).
    env = {"NCCL_IB_HCA": "=" + ",".join(f"{d.device}:{d.port}" for d in node.rdma)}
    roce = [d for d in node.rdma if d.link_layer == "ethernet"]
    if not roce:
        return env
    if gids is None:
        env["NCCL_IB_GID_INDEX"] = str(DEFAULT_ROCE_GID_INDEX)
        return env
    indexes = {d.device: nccl_gid_index(gids, d.device, d.port, d.interface) for d in roce}
    missing = sorted(device for device, index in indexes.items() if index is None)
    if missing:
        raise ValueError(f"{node.name}: no RoCE v2 IPv4 GID on {', '.join(missing)}")
    if len(set(indexes.values())) != 1:
        raise ValueError(
            f"{node.name}: RoCE GID indexes differ between devices {indexes}; NCCL_IB_GID_INDEX "
            "takes one value: give every RoCE netdev its address in the same order"
        )
    env["NCCL_IB_GID_INDEX"] = str(next(iter(indexes.values())))
    return env


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
    engines = ", ".join(
        f"{name or 'default'}={value}" for name, value in engine_gid_indexes(spec, node).items()
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
        "RoCE: the GID table's RoCE v2 IPv4 entry must sit at the engines' "
        f"{GID_INDEX_VARIABLE} ({engines})",
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
    "DEFAULT_ROCE_GID_INDEX",
    "apply",
    "engine_gid_indexes",
    "gid_index_problems",
    "nccl_ib_env",
    "plan",
    "roce_problems",
]
