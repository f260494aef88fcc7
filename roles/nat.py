"""Role `nat`: the NAT gateway that lets exactly the spec's `nat.networks` reach the outside.

`/etc/nftables.d/deepfleet-nat.nft` holds one table, `ip deepfleet_nat`: masquerade on
`nat.outside_interface` for the listed networks' CIDRs only, and a forward chain that passes
those networks out (and their replies back) and drops any other forwarding out of, or new
connections in through, the outside interface. `deepfleet-nat.service` loads the table (and
again whenever nftables.service reloads, which flushes the ruleset), so the role never owns
/etc/nftables.conf. IPv4 forwarding is switched on at once and kept by a sysctl.d file.

In the lab the same rules load for real on the infra node (its one interface, `host0`, is both
inside and outside: the rules load and count, but lab nodes have no route out through it).
"""

from __future__ import annotations

from ipaddress import IPv4Network

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import systemd

from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Nat, Node
from roles import _converge as converge
from roles._files import put_file
from roles._state import Probes

ROLE = "nat"
RULES_FILE = "/etc/nftables.d/deepfleet-nat.nft"
UNIT_FILE = "/etc/systemd/system/deepfleet-nat.service"
SYSCTL_FILE = "/etc/sysctl.d/60-deepfleet-nat.conf"
TABLE = "ip deepfleet_nat"
CONTAINER_BRIDGES = ("docker0", "br-*")


def translated_networks(spec: ClusterSpec) -> list[IPv4Network]:
    """The CIDRs that are masqueraded: exactly those of nat.networks, in spec order."""
    assert spec.nat is not None
    return [spec.network(name).cidr for name in spec.nat.networks]


def render_rules(spec: ClusterSpec, nat: Nat) -> str:
    return render(
        "nat/deepfleet-nat.nft.j2",
        outside=nat.outside_interface,
        network_names=list(nat.networks),
        cidrs=[str(c) for c in translated_networks(spec)],
        container_bridges=list(CONTAINER_BRIDGES),
    )


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    nat = spec.nat
    if nat is None or nat.node != node.name:
        return None
    cidrs = [str(c) for c in translated_networks(spec)]
    role = RolePlan(role=ROLE)
    role.packages = ["nftables"]
    role.services = ["nftables.service", "deepfleet-nat.service"]
    role.files = [
        HostFile(RULES_FILE, render_rules(spec, nat)),
        HostFile(UNIT_FILE, render("nat/deepfleet-nat.service.j2", rules=RULES_FILE)),
        HostFile(SYSCTL_FILE, render("nat/60-deepfleet-nat.conf.j2", cidrs=cidrs)),
    ]
    role.summary = [
        f"{RULES_FILE}: masquerade {', '.join(cidrs)} ({', '.join(nat.networks)}) out of "
        f"{nat.outside_interface}; no other forwarding through it",
        f"{SYSCTL_FILE}: net.ipv4.ip_forward = 1",
        "deepfleet-nat.service loads table deepfleet_nat (again after nftables reloads)",
    ]
    if spec.is_lab:
        role.summary.append(
            f"lab: rules load for real; {nat.outside_interface} is the node's only interface"
        )
    return role


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(
        sysctls=("net.ipv4.ip_forward",), units=("nftables.service", "deepfleet-nat.service")
    )


@deploy("NAT gateway (nftables)")
def apply(spec: ClusterSpec, node: Node) -> None:
    role = plan(spec, node)
    if role is None:
        return
    converge.packages(name=f"[{ROLE}] Install nftables", packages=role.packages)
    rules, unit, sysctl = (put_file(f, ROLE) for f in role.files)
    converge.sysctl(
        name=f"[{ROLE}] Enable IPv4 forwarding now",
        key="net.ipv4.ip_forward",
        value=1,
    )
    systemd.daemon_reload(
        name=f"[{ROLE}] Reload systemd units (deepfleet-nat)",
        _if=lambda: _changed([unit]),
    )
    converge.service(
        name=f"[{ROLE}] Enable nftables",
        service="nftables.service",
        running=None,
        enabled=True,
    )
    converge.service(
        name=f"[{ROLE}] Start and enable deepfleet-nat",
        service="deepfleet-nat.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"[{ROLE}] Load the changed NAT rules",
        service="deepfleet-nat.service",
        reloaded=True,
        _if=lambda: _changed([rules, unit]),
    )
    del sysctl  # the file keeps the setting over reboots; the sysctl op applies it now


def _changed(ops: list[OperationMeta]) -> bool:
    return any(op.is_complete() and op.did_change() for op in ops)
