"""What the lab should look like, decided from the cluster spec without touching the host.

`plan_from_spec` is the one place where the spec is mapped onto lab nodes, names and
addresses; everything that runs commands takes a `LabPlan`, never the spec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import PurePosixPath
from typing import Protocol

from infra.errors import Problem, UserError

# Every host-side object the lab creates (network namespaces, veths, the nft table) carries
# this prefix, so `lab down` can find leftovers even when the state file is gone.
PREFIX = "dfl"
NETNS_PREFIX = f"{PREFIX}-"
VETH_PREFIX = f"{PREFIX}v-"
NFT_TABLE = "deepfleet_lab"
IFNAMSIZ = 15  # Linux interface names are at most 15 bytes.

# Where the shared model storage appears inside a node (production mounts NFS there).
MODELS_MOUNT = "/data/models"
# The node's only interface. nspawn's own name for a container veth, which lab specs refer to
# (e.g. as the NAT node's outside interface).
NODE_IFACE = "host0"
DEFAULT_LB_PORT = 8000
# Order in which `--nodes N` picks nodes: a load balancer first, then GPU nodes, then the rest.
GROUP_ORDER = ("lb", "gpu")


# The spec is written elsewhere (infra/spec.py); the lab only needs these attributes, declared
# read-only so pydantic models with list fields match structurally.
class NodeLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def groups(self) -> Sequence[str]: ...
    @property
    def address(self) -> IPv4Address | None: ...


class NetworkLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def cidr(self) -> IPv4Network: ...


class LabSettingsLike(Protocol):
    @property
    def bridge(self) -> str: ...
    @property
    def network(self) -> str: ...
    @property
    def host_address(self) -> IPv4Address: ...
    @property
    def models_dir(self) -> str: ...


class SpecLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def nodes(self) -> Sequence[NodeLike]: ...
    @property
    def networks(self) -> Sequence[NetworkLike]: ...
    @property
    def lab(self) -> LabSettingsLike | None: ...


@dataclass(frozen=True)
class LabNode:
    name: str
    address: IPv4Address
    groups: tuple[str, ...]

    @property
    def netns(self) -> str:
        return NETNS_PREFIX + self.name

    @property
    def host_veth(self) -> str:
        return veth_name(self.name)


@dataclass(frozen=True)
class LabPlan:
    name: str
    bridge: str
    host_address: IPv4Address
    network: IPv4Network
    models_dir: str
    nodes: tuple[LabNode, ...]
    lb_port: int = DEFAULT_LB_PORT
    models_mount: str = MODELS_MOUNT
    # The spec's model directories, relative to the models dir: created with a placeholder
    # (no weights in the lab) so engines and checksum checks find what production would have.
    model_paths: tuple[str, ...] = ()

    @property
    def host_interface(self) -> IPv4Interface:
        return IPv4Interface(f"{self.host_address}/{self.network.prefixlen}")

    @property
    def apt_proxy(self) -> str:
        return f"http://{self.host_address}:3142"

    @property
    def endpoint(self) -> str | None:
        for node in self.nodes:
            if "lb" in node.groups:
                return f"http://{node.address}:{self.lb_port}"
        return None

    def node(self, name: str) -> LabNode:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise UserError(f"no lab node named {name!r}", [Problem(f"lab nodes are: {known}")])


def veth_name(node: str) -> str:
    """Host-side veth name for a node: readable when it fits IFNAMSIZ, else a stable hash."""
    name = VETH_PREFIX + node
    if len(name) <= IFNAMSIZ and all(c.isalnum() or c in "-_." for c in node):
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()
    return (VETH_PREFIX + digest)[:IFNAMSIZ]


def _order_key(indexed: tuple[int, NodeLike]) -> tuple[int, int]:
    index, node = indexed
    for rank, group in enumerate(GROUP_ORDER):
        if group in node.groups:
            return rank, index
    return len(GROUP_ORDER), index


def plan_from_spec(spec: SpecLike, nodes: int | None = None) -> LabPlan:
    """Map a cluster spec onto lab nodes; `nodes` keeps the first N (lb, then gpu, then rest)."""
    settings = spec.lab
    if settings is None:
        raise UserError(
            f"spec {spec.name!r} has no `lab:` section",
            [
                Problem(
                    "the lab needs a bridge, a network and a host address",
                    path="lab",
                    hint="start from hosts/lab.yaml",
                )
            ],
        )
    problems: list[Problem] = []
    by_name = {network.name: network for network in spec.networks}
    network = by_name.get(settings.network)
    if network is None:
        raise UserError(
            "the lab network is not defined",
            [
                Problem(
                    f"unknown network {settings.network!r}",
                    path="lab.network",
                    hint=f"one of: {', '.join(sorted(by_name)) or '(none)'}",
                )
            ],
        )
    cidr = network.cidr
    if len(settings.bridge) > IFNAMSIZ:
        problems.append(
            Problem(
                f"bridge name {settings.bridge!r} is longer than 15 characters", path="lab.bridge"
            )
        )
    if settings.host_address not in cidr:
        problems.append(
            Problem(f"{settings.host_address} is not in {cidr}", path="lab.host_address")
        )
    ordered = [node for _, node in sorted(enumerate(spec.nodes), key=_order_key)]
    seen: set[IPv4Address] = {settings.host_address}
    for node in ordered:
        where = f"nodes[{node.name}].address"
        if node.address is None:
            problems.append(Problem("a lab node needs a fixed address", path=where))
            continue
        if node.address not in cidr:
            problems.append(Problem(f"{node.address} is not in the lab network {cidr}", path=where))
        if node.address in seen:
            problems.append(
                Problem(f"{node.address} is used twice (or is the bridge's address)", path=where)
            )
        seen.add(node.address)
    if problems:
        raise UserError("the spec cannot be turned into a lab", problems)
    if nodes is not None:
        if not 1 <= nodes <= len(ordered):
            raise UserError(
                f"--nodes {nodes} is out of range",
                [
                    Problem(
                        f"the spec {spec.name!r} has {len(ordered)} nodes",
                        hint=f"use --nodes between 1 and {len(ordered)}",
                    )
                ],
            )
        ordered = ordered[:nodes]
    load_balancer = getattr(spec, "load_balancer", None)
    port = getattr(load_balancer, "port", None)
    return LabPlan(
        name=spec.name,
        bridge=settings.bridge,
        host_address=settings.host_address,
        network=cidr,
        models_dir=str(PurePosixPath(settings.models_dir)),
        nodes=tuple(
            LabNode(name=n.name, address=n.address, groups=tuple(n.groups))
            for n in ordered
            if n.address is not None
        ),
        lb_port=int(port) if isinstance(port, int) else DEFAULT_LB_PORT,
        models_mount=_models_mount(spec),
        model_paths=tuple(str(getattr(m, "path", "")) for m in getattr(spec, "models", None) or ()),
    )


def _models_mount(spec: SpecLike) -> str:
    """Where the spec mounts its `bind` model storage (the lab's stand-in for NFS)."""
    for storage in getattr(spec, "storage", None) or ():
        if getattr(storage, "kind", None) == "bind":
            return str(getattr(storage, "mount_point", MODELS_MOUNT))
    return MODELS_MOUNT
