"""Role `netplan`: the node's network (NIC families, LACP bonds, VLANs, addresses, routes, DNS).

The whole network of a node is owned by one file, /etc/netplan/60-deepfleet.yaml, built as data
from the spec (not a text template: netplan is YAML, and dumping data cannot produce invalid
YAML). Other netplan files (installer, cloud-init) are removed, since two owners of a NIC
conflict. Before any operation runs, the rendered file goes through `netplan generate` on the
controller; a file netplan rejects stops the deploy and is never written. On real nodes a change
is applied by `deepfleet-netplan-apply`, which validates again with the node's netplan, arms a
rollback timer and is confirmed only over a *new* SSH connection: a change that cuts the
management network, or only refuses new connections, is never confirmed and the node restores
its last working config by itself. The lab renders, validates and writes the file, and never
applies it (its kernel has no bonding/VLAN).
"""

from __future__ import annotations

import re
import time
from typing import Any

import yaml
from pyinfra import host, logger
from pyinfra.api import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.connectors.util import clear_askpass_cache
from pyinfra.facts.files import Directory, FindFiles
from pyinfra.operations import files, python, server

from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Nic, Node, interface_address
from infra.validators import ConfigRejected, ToolMissing, check_netplan
from roles import _converge as converge
from roles import _state
from roles._files import put_file
from roles._state import Probes

NETPLAN_DIR = "/etc/netplan"
NETPLAN_FILE = f"{NETPLAN_DIR}/60-deepfleet.yaml"
APPLY_SCRIPT = "/usr/local/sbin/deepfleet-netplan-apply"
STATE_DIR = "/var/lib/deepfleet/netplan"
ROLLBACK_SECONDS = 120
# How long the deploy keeps trying to open a new SSH connection after applying. Well inside
# ROLLBACK_SECONDS, so that the confirmation lands before the node's timer rolls back.
RECONNECT_SECONDS = 60
RECONNECT_INTERVAL_SECONDS = 5
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
        "lab: render, validate (netplan generate on the controller) and write only; netplan.io "
        "is not installed, so nothing applies it"
        if spec.is_lab
        else "validate (netplan generate on the controller, then on the node), apply with "
        f"automatic rollback after {ROLLBACK_SECONDS} s unless confirmed over a new SSH connection",
        "remove other /etc/netplan/*.yaml files",
    ]
    return role


def validate(node: Node, config: HostFile) -> None:
    """`netplan generate --root-dir` over the rendered file, on the controller.

    Raises pyinfra's DeployError, which stops the whole deploy while pyinfra is still preparing
    it: no operation of the run has reached any node yet, so the rejected file is never written.
    The file is checked alone because it is all that /etc/netplan holds after the deploy (the
    role removes every other *.yaml). The node checks the directory again before applying."""
    try:
        check_netplan([config])
    except ConfigRejected as error:
        # netplan names the file in its scratch root (/tmp/tmpXXXX/etc/netplan/...): name the
        # node's path instead, keeping netplan's line and column.
        output = re.sub(r"\S*(?=/etc/netplan/)", "", error.output.strip())
        raise DeployError(
            f"{node.name}: netplan generate rejected the rendered {config.path}, so nothing was "
            f"written to the node:\n{output}\n"
            f"fix nodes[{node.name}] (nics, bonds, vlans, addresses, routes) in the cluster "
            "spec; `deepfleet plan SPEC --out DIR` writes the rendered file to look at"
        ) from None
    except ToolMissing as error:
        raise DeployError(
            f"{node.name}: cannot check {config.path} before writing it: {error} on this "
            "controller (bootstrap.sh installs it)"
        ) from None


def _reconnect(state: Any, host: Any, node: str, deadline_s: float, interval_s: float) -> bool:
    """Drop the SSH connection that applied the change and open a new one (python.call).

    pyinfra keeps one SSH client per host for the whole run, and a connection that is already
    open can outlive a change that breaks new ones (an MTU that drops the key exchange, a
    firewall that allows only established flows). The confirm step that follows runs over the
    new connection, and the node's script refuses a confirmation from the connection that
    applied. This is what `server.reboot` does to reconnect, without the reboot."""
    # As server.reboot: forget the sudo askpass file rather than run `rm` over a connection
    # that may be dead; the new connection uploads it again when it needs it.
    clear_askpass_cache(host)
    old_client = getattr(host.connector, "client", None)
    host.disconnect()  # for SSH this only drops cached SFTP channels: close the client too
    if old_client is not None:
        old_client.close()
    deadline = time.monotonic() + deadline_s
    while True:
        host.connect(reason="a new connection to confirm the network config", show_errors=False)
        if host.connected:
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval_s)
    host.log_styled(
        f"{node}: no new SSH connection within {deadline_s:.0f} s of applying "
        f"{NETPLAN_FILE}; the change stays unconfirmed and the node restores its last "
        f"confirmed network config by itself {ROLLBACK_SECONDS} s after applying. Check the "
        "node's addresses, routes and MTU in the spec against the switch",
        fg="red",
        log_func=logger.error,
    )
    return False  # fails this host only; python.call logs nothing more


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
    config_file = role.files[0]
    # Here, while pyinfra prepares the deploy, and in the lab too: a file netplan rejects must
    # not reach any node (on a real node the generator would also fail at the next boot). A
    # file the snapshot shows on the node byte for byte is not written again, so it needs no
    # check; that keeps netplan (about 0.3 s of CPU per node) out of no-op runs and drift checks.
    if not _state.file_matches(
        config_file.path,
        config_file.content.encode(),
        config_file.mode,
        config_file.user,
        config_file.group,
    ):
        validate(node, config_file)
    if not spec.is_lab:
        # Not in the lab: netplan's systemd generator would hand the node's veth to
        # systemd-networkd at the next daemon-reload, i.e. apply the file. The lab relies on
        # the controller's `netplan generate` above instead.
        converge.packages(name="[netplan] Install netplan.io", packages=role.packages)
    put_file(role.files[1], "netplan")
    if not spec.is_lab and not _confirmed_before():
        # Before deepfleet first writes the network config, keep the node's working one as
        # the rollback target.
        server.shell(
            name="[netplan] Keep the node's current network config as the rollback target",
            commands=[f"{APPLY_SCRIPT} snapshot"],
        )
    config = put_file(config_file, "netplan")
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
    # Only a connection opened after the change proves that the management network still
    # takes new ones; the script refuses to confirm over the connection that applied.
    python.call(
        name="[netplan] Open a new SSH connection to the node",
        function=_reconnect,
        node=node.name,
        deadline_s=RECONNECT_SECONDS,
        interval_s=RECONNECT_INTERVAL_SECONDS,
        _if=any_changed,
    )
    server.shell(
        name="[netplan] Confirm the network config over the new connection",
        commands=[f"{APPLY_SCRIPT} confirm"],
        _if=any_changed,
    )
