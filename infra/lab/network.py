"""The lab's network: one private bridge on the host, one namespace + veth per node.

Nodes get an address on the bridge's /24 and no default route; an nftables table on the host
drops anything the host would forward to or from the bridge, so nothing leaves the lab even if
a node adds a route itself (nodes have CAP_NET_ADMIN).
"""

from __future__ import annotations

from pathlib import Path

from infra.lab.plan import NFT_TABLE, NODE_IFACE, LabNode, LabPlan
from infra.lab.system import run

NETNS_DIR = Path("/run/netns")


def bridge_commands(plan: LabPlan) -> list[list[str]]:
    return [
        ["ip", "link", "add", plan.bridge, "type", "bridge"],
        ["ip", "addr", "add", str(plan.host_interface), "dev", plan.bridge],
        ["ip", "link", "set", plan.bridge, "up"],
    ]


def firewall_ruleset(plan: LabPlan) -> str:
    """An nft script that isolates the bridge from the host's other interfaces."""
    return (
        f"table inet {NFT_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority -10; policy accept;\n"
        # Node-to-node frames are bridged, and with br_netfilter (built into some kernels)
        # they pass this hook too with the bridge as both ends: only routed traffic is dropped.
        f'    iifname "{plan.bridge}" oifname != "{plan.bridge}" drop\n'
        f'    oifname "{plan.bridge}" iifname != "{plan.bridge}" drop\n'
        "  }\n"
        "}\n"
    )


def node_commands(plan: LabPlan, node: LabNode) -> list[list[str]]:
    """Namespace, veth pair (host0 inside), address, links up; deliberately no route."""
    iface = f"{node.address}/{plan.network.prefixlen}"
    return [
        ["ip", "netns", "add", node.netns],
        [
            "ip",
            "link",
            "add",
            node.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            NODE_IFACE,
            "netns",
            node.netns,
        ],
        ["ip", "link", "set", node.host_veth, "master", plan.bridge, "up"],
        ["ip", "-n", node.netns, "addr", "add", iface, "dev", NODE_IFACE],
        ["ip", "-n", node.netns, "link", "set", "lo", "up"],
        ["ip", "-n", node.netns, "link", "set", NODE_IFACE, "up"],
    ]


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def ensure_bridge(plan: LabPlan) -> None:
    if not link_exists(plan.bridge):
        for argv in bridge_commands(plan):
            run(argv)
    # Replace the table as a whole so a changed bridge name never leaves a stale rule behind.
    run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
    run(["nft", "-f", "-"], stdin_text=firewall_ruleset(plan))


def ensure_node_network(plan: LabPlan, node: LabNode) -> None:
    if netns_exists(node.netns) and link_exists(node.host_veth):
        return
    # A half-made node (namespace without veth, or the reverse) is rebuilt from scratch.
    remove_node_network(node.netns, node.host_veth)
    for argv in node_commands(plan, node):
        run(argv)


def remove_node_network(netns: str, veth: str) -> None:
    if link_exists(veth):
        run(["ip", "link", "del", veth], check=False)
    if netns_exists(netns):
        run(["ip", "netns", "del", netns], check=False)
