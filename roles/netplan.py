"""Role `netplan`: the node's network (NIC families, LACP bonds, VLANs, addresses, routes, DNS).

The whole network of a node is owned by one file, /etc/netplan/60-deepfleet.yaml, built as data
from the spec (not a text template: netplan is YAML, and dumping data cannot produce invalid
YAML). Other netplan files (installer, cloud-init) are removed, since two owners of a NIC
conflict. On real nodes a change is applied by `deepfleet-netplan-apply`, which arms a rollback
timer first and is confirmed from a *new* SSH connection: a change that cuts the management
network is never confirmed and the node restores its last working config by itself. The lab
renders, validates and writes the file, and never applies it (its kernel has no bonding/VLAN).
"""

from __future__ import annotations

from typing import Any

import yaml
from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Directory, FindFiles
from pyinfra.operations import files, server

from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Nic, Node, interface_address
from roles import _converge as converge
from roles import _state
from roles._files import put_file
from roles._state import Probes

NETPLAN_DIR = "/etc/netplan"
NETPLAN_FILE = f"{NETPLAN_DIR}/60-deepfleet.yaml"
APPLY_SCRIPT = "/usr/local/sbin/deepfleet-netplan-apply"
STATE_DIR = "/var/lib/deepfleet/netplan"
ROLLBACK_SECONDS = 120
HEADER = (
    "# Managed by deepfleet (role netplan) from the cluster spec. Hand edits show up as drift.\n"
)


def _ethernet_ids(nic: Nic) -> list[str]:
    """Netplan ids of a NIC family: one id with a name glob, or one per listed MAC."""
    if nic.match is not None:
        return [nic.name]
    return [f"{nic.name}{i}" for i in range(len(nic.macs))]


def netplan_document(spec: ClusterSpec, node: Node) -> dict[str, Any]:
    networks = {n.name: n for n in spec.networks}

    ethernets: dict[str, Any] = {}
    for nic in node.nics:
        for index, netplan_id in enumerate(_ethernet_ids(nic)):
            entry: dict[str, Any] = {
                "match": {"name": nic.match}
                if nic.match
                else {"macaddress": nic.macs[index].lower()},
                "dhcp4": False,
                "dhcp6": False,
            }
            if nic.macs:
                entry["set-name"] = netplan_id
            if nic.mtu:
                entry["mtu"] = nic.mtu
            ethernets[netplan_id] = entry

    families = {nic.name: _ethernet_ids(nic) for nic in node.nics}
    bonds: dict[str, Any] = {}
    for bond in node.bonds:
        parameters: dict[str, Any] = {
            "mode": bond.mode,
            "mii-monitor-interval": bond.mii_monitor_interval,
        }
        if bond.mode == "802.3ad":
            parameters["lacp-rate"] = bond.lacp_rate
        if bond.mode in ("802.3ad", "balance-xor", "balance-alb"):
            parameters["transmit-hash-policy"] = bond.transmit_hash_policy
        entry = {
            "interfaces": [i for member in bond.members for i in families.get(member, [member])],
            "dhcp4": False,
            "dhcp6": False,
            "parameters": parameters,
        }
        if bond.mtu:
            entry["mtu"] = bond.mtu
        bonds[bond.name] = entry

    vlans: dict[str, Any] = {}
    for vlan in node.vlans:
        entry = {"id": vlan.id, "link": vlan.link, "dhcp4": False, "dhcp6": False}
        if vlan.mtu:
            entry["mtu"] = vlan.mtu
        vlans[vlan.interface] = entry

    by_interface = {**ethernets, **bonds, **vlans}
    for address in node.addresses:
        target = by_interface[_address_target(node, address.interface)]
        network = networks[address.network]
        target.setdefault("addresses", []).append(str(interface_address(address, network)))
        if address.default_route and network.gateway is not None:
            target.setdefault("routes", []).append({"to": "default", "via": str(network.gateway)})
            nameservers = (
                node.nameservers if node.nameservers is not None else spec.site.dns.servers
            )
            target["nameservers"] = {"addresses": [str(s) for s in nameservers]}
            if spec.site.dns.search:
                target["nameservers"]["search"] = list(spec.site.dns.search)
    for route in node.routes:
        entry = {"to": str(route.to), "via": str(route.via)}
        if route.metric is not None:
            entry["metric"] = route.metric
        by_interface[_address_target(node, route.interface)].setdefault("routes", []).append(entry)

    network_section: dict[str, Any] = {"version": 2, "renderer": "networkd"}
    for key, section in (("ethernets", ethernets), ("bonds", bonds), ("vlans", vlans)):
        if section:
            network_section[key] = section
    return {"network": network_section}


def _address_target(node: Node, interface: str) -> str:
    # An address on a NIC family matched by MACs goes on its first port.
    for nic in node.nics:
        if nic.name == interface and not nic.match:
            return f"{nic.name}0"
    return interface


def render_netplan(spec: ClusterSpec, node: Node) -> str:
    body = yaml.safe_dump(netplan_document(spec, node), sort_keys=False, default_flow_style=False)
    return HEADER + body


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    if not node.nics:
        return None  # nothing in the spec describes this node's ports (cloud/lab defaults)
    role = RolePlan(role="netplan")
    role.files = [
        HostFile(NETPLAN_FILE, render_netplan(spec, node), mode="600"),
        HostFile(
            APPLY_SCRIPT,
            render(
                "netplan/deepfleet-netplan-apply.sh.j2",
                netplan_file=NETPLAN_FILE,
                rollback_seconds=ROLLBACK_SECONDS,
            ),
            mode="755",
        ),
    ]
    role.packages = [] if spec.is_lab else ["netplan.io"]
    bonds = ", ".join(f"{b.name}({'+'.join(b.members)} {b.mode})" for b in node.bonds) or "no bonds"
    vlans = ", ".join(f"{v.interface}(vlan {v.id})" for v in node.vlans) or "no VLANs"
    role.summary = [
        f"{NETPLAN_FILE}: {len(node.nics)} NIC families, {bonds}, {vlans}",
        "lab: render, validate (on the controller) and write only; netplan.io is not installed, "
        "so nothing applies it"
        if spec.is_lab
        else f"apply with automatic rollback after {ROLLBACK_SECONDS} s unless confirmed over a new SSH session",
        "remove other /etc/netplan/*.yaml files",
    ]
    return role


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(paths=(f"{STATE_DIR}/confirmed",), directories=(NETPLAN_DIR,))


def _confirmed_before() -> bool:
    if _state.snapshot() is not None:
        return _state.directory_matches(f"{STATE_DIR}/confirmed")
    return bool(host.get_fact(Directory, path=f"{STATE_DIR}/confirmed"))


def _netplan_files() -> list[str]:
    """The *.yaml files directly in /etc/netplan."""
    entries = _state.listed(NETPLAN_DIR)
    if entries is None:
        entries = host.get_fact(FindFiles, path=NETPLAN_DIR, fname="*.yaml", maxdepth=1) or []
    return [path for path in entries if path.endswith(".yaml")]


@deploy("Network (netplan)")
def apply(spec: ClusterSpec, node: Node) -> None:
    role = plan(spec, node)
    if role is None:
        return
    if not spec.is_lab:
        # Not in the lab: netplan's systemd generator would hand the node's veth to
        # systemd-networkd at the next daemon-reload, i.e. apply the file. The lab checks the
        # file with `netplan generate` on the controller instead (tests/test_golden.py).
        converge.packages(name="[netplan] Install netplan.io", packages=role.packages)
    put_file(role.files[1], "netplan")
    if not spec.is_lab and not _confirmed_before():
        # Before deepfleet first writes the network config, keep the node's working one as
        # the rollback target.
        server.shell(
            name="[netplan] Keep the node's current network config as the rollback target",
            commands=[f"{APPLY_SCRIPT} snapshot"],
        )
    config = put_file(role.files[0], "netplan")
    stale = [path for path in _netplan_files() if path != NETPLAN_FILE]
    removals = [
        files.file(
            name=f"[netplan] Remove netplan file not owned by the spec: {path}",
            path=path,
            present=False,
        )
        for path in stale
    ]
    if spec.is_lab:
        return  # no bonding or VLAN support in the lab kernel: never apply (docs/lab.md)
    changed = [config, *removals]

    def any_changed() -> bool:
        return any(op.did_change() for op in changed)

    server.shell(
        name="[netplan] Apply the network config (rolls back by itself unless confirmed)",
        commands=[f"{APPLY_SCRIPT} apply"],
        _if=any_changed,
    )
    # A separate command opens a new SSH session: reaching the node proves the management
    # network survived, and only then is the rollback disarmed.
    server.shell(
        name="[netplan] Confirm the network config over a new connection",
        commands=[f"{APPLY_SCRIPT} confirm"],
        _if=any_changed,
    )
