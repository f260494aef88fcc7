"""Cross-field rules of the cluster spec.

Each rule names the spec path it is about, so the loader can point at the YAML line. Rules run
after every field parsed, and all of them run: the user sees every problem at once.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infra.spec import ClusterSpec

SpecPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Violation:
    path: SpecPath
    message: str
    hint: str | None = None


class SpecRuleViolations(Exception):
    """Raised from the model validator; not a ValueError so pydantic passes it through intact."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__(f"{len(violations)} spec rule violation(s)")
        self.violations = violations


Rule = Callable[["ClusterSpec"], Iterator[Violation]]
RULES: list[Rule] = []


def rule(function: Rule) -> Rule:
    RULES.append(function)
    return function


def check_rules(spec: ClusterSpec) -> None:
    violations = [v for check in RULES for v in check(spec)]
    if violations:
        raise SpecRuleViolations(violations)


def _duplicates(items: list[str]) -> set[str]:
    return {item for item, count in Counter(items).items() if count > 1}


def _node_index(spec: ClusterSpec) -> dict[str, int]:
    return {node.name: i for i, node in enumerate(spec.nodes)}


def _refers_to_node(
    spec: ClusterSpec, name: str, path: SpecPath, group: str | None
) -> Iterator[Violation]:
    names = _node_index(spec)
    if name not in names:
        yield Violation(path, f"node {name!r} is not defined", _suggest(name, list(names)))
    elif group and group not in spec.nodes[names[name]].groups:
        yield Violation(
            path, f"node {name!r} is not in group {group!r}", f"add {group!r} to its groups"
        )


def _suggest(name: str, choices: list[str]) -> str | None:
    from difflib import get_close_matches

    close = get_close_matches(name, choices, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"defined: {', '.join(choices)}" if choices else None


# --- names and addresses -------------------------------------------------------------------


@rule
def unique_names(spec: ClusterSpec) -> Iterator[Violation]:
    for section, items in (
        ("nodes", [n.name for n in spec.nodes]),
        ("networks", [n.name for n in spec.networks]),
        ("storage", [s.name for s in spec.storage]),
        ("models", [m.name for m in spec.models]),
        ("deployments", [d.name for d in spec.deployments]),
    ):
        for duplicate in sorted(_duplicates(items)):
            second = [i for i, item in enumerate(items) if item == duplicate][1]
            yield Violation(
                (section, second, "name"),
                f"name {duplicate!r} is used twice",
                "names must be unique",
            )


@rule
def unique_addresses(spec: ClusterSpec) -> Iterator[Violation]:
    seen: dict[str, str] = {}
    for i, node in enumerate(spec.nodes):
        own = {str(a.address) for a in node.addresses}
        candidates: list[tuple[SpecPath, str]] = []
        if node.address is not None and str(node.address) not in own:
            candidates.append((("nodes", i, "address"), str(node.address)))
        candidates += [
            (("nodes", i, "addresses", j, "address"), str(a.address))
            for j, a in enumerate(node.addresses)
        ]
        if node.bmc is not None:
            candidates.append((("nodes", i, "bmc"), str(node.bmc)))
        for path, address in candidates:
            if address in seen and seen[address] != node.name:
                yield Violation(path, f"address {address} is also used by node {seen[address]!r}")
            elif address in seen:
                yield Violation(path, f"address {address} is given twice on this node")
            seen[address] = node.name


@rule
def networks_are_consistent(spec: ClusterSpec) -> Iterator[Violation]:
    for i, network in enumerate(spec.networks):
        if network.gateway is not None and network.gateway not in network.cidr:
            yield Violation(
                ("networks", i, "gateway"),
                f"gateway {network.gateway} is outside {network.cidr}",
                "the gateway must be an address of the network itself",
            )
    cidrs = [(i, n.cidr) for i, n in enumerate(spec.networks)]
    for i, a in cidrs:
        for j, b in cidrs:
            if i < j and a.overlaps(b):
                yield Violation(
                    ("networks", j, "cidr"),
                    f"{b} overlaps network {spec.networks[i].name!r} ({a})",
                    "networks must not overlap",
                )


@rule
def addresses_fit_their_networks(spec: ClusterSpec) -> Iterator[Violation]:
    networks = {n.name: n for n in spec.networks}
    for i, node in enumerate(spec.nodes):
        defaults = 0
        for j, entry in enumerate(node.addresses):
            path: SpecPath = ("nodes", i, "addresses", j)
            network = networks.get(entry.network)
            if network is None:
                yield Violation(
                    (*path, "network"),
                    f"network {entry.network!r} is not defined",
                    _suggest(entry.network, list(networks)),
                )
                continue
            if entry.address not in network.cidr:
                yield Violation(
                    (*path, "address"),
                    f"{entry.address} is outside network {network.name!r} ({network.cidr})",
                )
            elif entry.address in (network.cidr.network_address, network.cidr.broadcast_address):
                yield Violation((*path, "address"), f"{entry.address} is not a host address")
            if entry.interface not in node.interfaces:
                yield Violation(
                    (*path, "interface"),
                    f"interface {entry.interface!r} is not defined on node {node.name!r}",
                    _suggest(entry.interface, node.interfaces),
                )
            if entry.default_route:
                defaults += 1
                if network.gateway is None:
                    yield Violation(
                        (*path, "default_route"),
                        f"network {network.name!r} has no gateway for a default route",
                        f"set networks[{network.name}].gateway",
                    )
                if defaults > 1:
                    yield Violation((*path, "default_route"), "a node has one default route")
        if node.address is not None and spec.provider.kind != "aws":
            management = [n for n in spec.networks if n.purpose == "management"]
            if not any(node.address in n.cidr for n in management):
                yield Violation(
                    ("nodes", i, "address"),
                    f"{node.address} is in no management network",
                    "the address pyinfra uses must be inside a network with purpose: management",
                )


@rule
def nodes_have_addresses(spec: ClusterSpec) -> Iterator[Violation]:
    if spec.provider.kind == "aws":
        return
    for i, node in enumerate(spec.nodes):
        if node.address is None:
            yield Violation(
                ("nodes", i),
                f"node {node.name!r} has no 'address'",
                "bare-metal and lab nodes need the management address pyinfra connects to",
            )


# --- interfaces ----------------------------------------------------------------------------


@rule
def interfaces_are_wired(spec: ClusterSpec) -> Iterator[Violation]:
    for i, node in enumerate(spec.nodes):
        for duplicate in sorted(_duplicates(node.interfaces)):
            yield Violation(("nodes", i), f"interface name {duplicate!r} is defined twice")
        nic_names = [n.name for n in node.nics]
        bonded: dict[str, str] = {}
        for j, bond in enumerate(node.bonds):
            for k, member in enumerate(bond.members):
                path: SpecPath = ("nodes", i, "bonds", j, "members", k)
                if member not in nic_names:
                    yield Violation(
                        path,
                        f"bond member {member!r} is not one of the node's nics",
                        _suggest(member, nic_names),
                    )
                elif member in bonded:
                    yield Violation(path, f"{member!r} is already a member of {bonded[member]!r}")
                else:
                    bonded[member] = bond.name
        links = nic_names + [b.name for b in node.bonds]
        for j, vlan in enumerate(node.vlans):
            if vlan.link not in links:
                yield Violation(
                    ("nodes", i, "vlans", j, "link"),
                    f"VLAN link {vlan.link!r} is neither a nic nor a bond of this node",
                    _suggest(vlan.link, links),
                )
        networks = {n.name: n for n in spec.networks}
        vlan_ids = {v.interface: v.id for v in node.vlans}
        for j, entry in enumerate(node.addresses):
            network = networks.get(entry.network)
            if network is None or network.vlan is None or entry.interface not in vlan_ids:
                continue
            if vlan_ids[entry.interface] != network.vlan:
                yield Violation(
                    ("nodes", i, "addresses", j, "interface"),
                    f"{entry.interface} carries VLAN {vlan_ids[entry.interface]} but network "
                    f"{network.name!r} is VLAN {network.vlan}",
                )
        for j, route in enumerate(node.routes):
            if route.interface not in node.interfaces:
                yield Violation(
                    ("nodes", i, "routes", j, "interface"),
                    f"interface {route.interface!r} is not defined on node {node.name!r}",
                    _suggest(route.interface, node.interfaces),
                )
            attached = [networks[a.network] for a in node.addresses if a.network in networks]
            if not any(route.via in n.cidr for n in attached if n):
                yield Violation(
                    ("nodes", i, "routes", j, "via"),
                    f"gateway {route.via} is not on any network this node has an address in",
                )


@rule
def groups_match_hardware(spec: ClusterSpec) -> Iterator[Violation]:
    for i, node in enumerate(spec.nodes):
        if "gpu" in node.groups and node.gpus is None and spec.lab is None:
            yield Violation(
                ("nodes", i, "groups"),
                f"node {node.name!r} is in group 'gpu' but declares no gpus",
                "add a 'gpus:' section (model, count) or remove the group",
            )
        if node.gpus is not None and "gpu" not in node.groups:
            yield Violation(
                ("nodes", i, "gpus"),
                f"node {node.name!r} declares gpus but is not in group 'gpu'",
                "add 'gpu' to its groups",
            )
        for duplicate in sorted(_duplicates(list(node.groups))):
            yield Violation(("nodes", i, "groups"), f"group {duplicate!r} is listed twice")


# --- storage, models, deployments ----------------------------------------------------------


@rule
def storage_is_served(spec: ClusterSpec) -> Iterator[Violation]:
    networks = [n.name for n in spec.networks]
    exports: dict[tuple[str | None, str | None], str] = {}
    for i, storage in enumerate(spec.storage):
        if storage.server is not None:
            yield from _refers_to_node(spec, storage.server, ("storage", i, "server"), "storage")
        key = (storage.server, storage.export)
        if storage.kind == "nfs" and key in exports:
            yield Violation(
                ("storage", i, "export"),
                f"{storage.server}:{storage.export} is already served as {exports[key]!r}",
                "one storage entry per server and export",
            )
        exports[key] = storage.name
        for j, network in enumerate(storage.networks):
            if network not in networks:
                yield Violation(
                    ("storage", i, "networks", j),
                    f"network {network!r} is not defined",
                    _suggest(network, networks),
                )
        if storage.kind == "bind" and spec.lab is None:
            yield Violation(
                ("storage", i, "kind"),
                "storage kind 'bind' exists only in the lab",
                "use nfs, fsx-lustre or efs for real clusters",
            )


@rule
def models_are_stored(spec: ClusterSpec) -> Iterator[Violation]:
    storage = [s.name for s in spec.storage]
    for i, model in enumerate(spec.models):
        if model.storage not in storage:
            yield Violation(
                ("models", i, "storage"),
                f"storage {model.storage!r} is not defined",
                _suggest(model.storage, storage),
            )


@rule
def deployments_have_hardware(spec: ClusterSpec) -> Iterator[Violation]:
    models = [m.name for m in spec.models]
    used_by: dict[str, str] = {}
    for i, deployment in enumerate(spec.deployments):
        if deployment.model not in models:
            yield Violation(
                ("deployments", i, "model"),
                f"model {deployment.model!r} is not defined",
                _suggest(deployment.model, models),
            )
        sizes = {len(replica) for replica in deployment.replicas}
        if len(sizes) > 1:
            yield Violation(
                ("deployments", i, "replicas"),
                "replicas have different node counts",
                "every replica of a deployment spans the same number of nodes",
            )
        for r, replica in enumerate(deployment.replicas):
            path: SpecPath = ("deployments", i, "replicas", r)
            if not replica:
                yield Violation(path, "a replica needs at least one node")
                continue
            for k, name in enumerate(replica):
                problems = list(_refers_to_node(spec, name, (*path, k), "gpu"))
                yield from problems
                if problems:
                    continue
                owner = f"{deployment.name} replica {r + 1}"
                if name in used_by:
                    yield Violation(
                        (*path, k),
                        f"node {name!r} already serves {used_by[name]}",
                        "a GPU node serves one replica; add nodes or remove it from one",
                    )
                used_by[name] = owner
            yield from _replica_gpus(spec, i, r)
        if deployment.dist_port == deployment.port:
            yield Violation(("deployments", i, "dist_port"), "dist_port equals the serving port")
        parallel = deployment.parallelism
        if parallel.dp_attention and parallel.dp == 1:
            # SGLang would run plain tensor parallelism: one attention group is no DP attention,
            # and the memory and throughput the user planned for would silently not happen.
            yield Violation(
                ("deployments", i, "parallelism", "dp_attention"),
                "dp_attention needs dp > 1: with dp 1 attention is not split and the engine "
                "runs plain tensor parallelism",
                f"set dp to the number of attention groups (dp: {parallel.tp} gives each GPU "
                "its own, as SGLang's DeepSeek recipes do), or remove dp_attention"
                if parallel.tp > 1
                else "remove dp_attention (it splits attention over the tp GPUs; tp is 1)",
            )
        if deployment.disaggregation is not None:
            prefill = deployment.disaggregation.prefill_replicas
            for k, index in enumerate(prefill):
                if not 1 <= index <= len(deployment.replicas):
                    yield Violation(
                        ("deployments", i, "disaggregation", "prefill_replicas", k),
                        f"replica {index} does not exist (replicas are numbered from 1)",
                    )
            if len(set(prefill)) >= len(deployment.replicas):
                yield Violation(
                    ("deployments", i, "disaggregation", "prefill_replicas"),
                    "every replica prefills; disaggregation needs at least one decode replica",
                )


def _replica_gpus(spec: ClusterSpec, i: int, r: int) -> Iterator[Violation]:
    deployment = spec.deployments[i]
    names = _node_index(spec)
    nodes = [spec.nodes[names[n]] for n in deployment.replicas[r] if n in names]
    if len(nodes) != len(deployment.replicas[r]) or spec.lab is not None:
        # The lab has no GPUs: its stand-in engine ignores the parallelism.
        return
    gpus = [n.gpus for n in nodes]
    if any(g is None for g in gpus):
        return  # reported by groups_match_hardware
    kinds = {(g.model, g.count) for g in gpus if g is not None}
    path: SpecPath = ("deployments", i, "replicas", r)
    if len(kinds) > 1:
        yield Violation(path, "the nodes of one replica must have the same GPU model and count")
        return
    ((_, per_node),) = kinds
    parallel = deployment.parallelism
    total = per_node * len(nodes)
    if parallel.tp % len(nodes):
        yield Violation(
            ("deployments", i, "parallelism", "tp"),
            f"tp {parallel.tp} is not a multiple of the replica's {len(nodes)} nodes",
        )
    if parallel.gpus != total:
        yield Violation(
            ("deployments", i, "parallelism"),
            f"the parallelism uses {parallel.gpus} GPUs but replica {r + 1} has {total} "
            f"({len(nodes)} node(s) x {per_node})",
            f"set tp to {total} (or tp x dp = {total} without DP attention)",
        )
    if parallel.dp_attention and parallel.tp % parallel.dp:
        yield Violation(
            ("deployments", i, "parallelism", "dp"),
            f"with DP attention dp ({parallel.dp}) must divide tp ({parallel.tp})",
        )


@rule
def roles_are_placed(spec: ClusterSpec) -> Iterator[Violation]:
    if spec.load_balancer is not None:
        for k, name in enumerate(spec.load_balancer.nodes):
            yield from _refers_to_node(spec, name, ("load_balancer", "nodes", k), "lb")
    if spec.nat is not None:
        yield from _refers_to_node(spec, spec.nat.node, ("nat", "node"), "nat")
        networks = [n.name for n in spec.networks]
        for k, network in enumerate(spec.nat.networks):
            if network not in networks:
                yield Violation(
                    ("nat", "networks", k),
                    f"network {network!r} is not defined",
                    _suggest(network, networks),
                )
    if spec.monitoring is not None:
        yield from _refers_to_node(spec, spec.monitoring.node, ("monitoring", "node"), "monitoring")
    for k, name in enumerate(spec.site.ntp.serve_from):
        yield from _refers_to_node(spec, name, ("site", "ntp", "serve_from", k), None)
    if spec.deployments and spec.load_balancer is None:
        yield Violation(
            ("deployments",),
            "deployments need a 'load_balancer' section in front of them",
            "add load_balancer: {nodes: [...], allowed_cidrs: [...]}",
        )


@rule
def ports_do_not_collide(spec: ClusterSpec) -> Iterator[Violation]:
    claims: dict[str, list[tuple[int, str, SpecPath]]] = defaultdict(list)
    every_node = [n.name for n in spec.nodes]

    def claim(nodes: list[str], port: int, owner: str, path: SpecPath) -> None:
        for node in nodes:
            claims[node].append((port, owner, path))

    claim(every_node, spec.site.ssh.port, "ssh", ("site", "ssh", "port"))
    for i, deployment in enumerate(spec.deployments):
        nodes = [n for replica in deployment.replicas for n in replica]
        claim(nodes, deployment.port, f"deployment {deployment.name}", ("deployments", i, "port"))
        claim(
            nodes,
            deployment.dist_port,
            f"deployment {deployment.name} (NCCL init)",
            ("deployments", i, "dist_port"),
        )
        disaggregation = deployment.disaggregation
        if disaggregation is not None:
            # The prefill engines listen on it (decode engines connect to it), on every node
            # of the replica as with the serving port.
            prefill = [
                n
                for number, replica in enumerate(deployment.replicas, start=1)
                if number in disaggregation.prefill_replicas
                for n in replica
            ]
            claim(
                prefill,
                disaggregation.bootstrap_port,
                f"deployment {deployment.name} (prefill/decode bootstrap)",
                ("deployments", i, "disaggregation", "bootstrap_port"),
            )
    lb = spec.load_balancer
    if lb is not None:
        claim(lb.nodes, lb.port, "load balancer", ("load_balancer", "port"))
        claim(lb.nodes, lb.stats_port, "load balancer stats", ("load_balancer", "stats_port"))
        if lb.router != "haproxy":
            claim(lb.nodes, lb.router_port, "model gateway", ("load_balancer", "router_port"))
    mon = spec.monitoring
    if mon is not None:
        claim([mon.node], mon.prometheus_port, "prometheus", ("monitoring", "prometheus_port"))
        claim([mon.node], mon.grafana_port, "grafana", ("monitoring", "grafana_port"))
        claim(
            every_node,
            mon.node_exporter_port,
            "node_exporter",
            ("monitoring", "node_exporter_port"),
        )
        gpu_nodes = [n.name for n in spec.nodes_in("gpu")]
        claim(
            gpu_nodes, mon.dcgm_exporter_port, "dcgm-exporter", ("monitoring", "dcgm_exporter_port")
        )
    reported: set[SpecPath] = set()
    for node, entries in claims.items():
        first: dict[int, str] = {}
        for port, owner, path in entries:
            if port in first and first[port] != owner and path not in reported:
                reported.add(path)
                yield Violation(
                    path,
                    f"port {port} on node {node!r} is already used by {first[port]}",
                    "give each service on a node its own port",
                )
            first.setdefault(port, owner)


@rule
def router_serves_the_deployments(spec: ClusterSpec) -> Iterator[Violation]:
    """The load balancer's router can reach every deployment the way its clients ask for it
    (roles/load_balancer.py builds what these rules allow)."""
    lb = spec.load_balancer
    if lb is None:
        return
    chat = [d for d in spec.deployments if not d.embedding]
    index = {d.name: i for i, d in enumerate(spec.deployments)}
    pd = [d for d in chat if d.disaggregation is not None]
    if pd and lb.router == "haproxy":
        yield Violation(
            ("load_balancer", "router"),
            f"deployment {pd[0].name!r} disaggregates prefill and decode, which only the smg "
            "router can pair",
            "set load_balancer.router: haproxy+smg",
        )
    if pd and len(pd) != len(chat):
        plain = next(d for d in chat if d.disaggregation is None)
        yield Violation(
            ("deployments", index[plain.name]),
            "one smg instance routes either prefill/decode pairs or plain workers, not both",
            "disaggregate every chat deployment, or none",
        )
    served = sorted({d.model for d in chat})  # engines answer to the model's name
    if lb.router != "haproxy" and len(served) > 1:
        yield Violation(
            ("load_balancer", "router"),
            f"router {lb.router} would send requests for {served[0]!r} to the engines of "
            f"{', '.join(repr(m) for m in served[1:])} too: smg does not route by model",
            "set load_balancer.router: haproxy (one backend per model), or serve one chat model",
        )
    embeddings = [d for d in spec.deployments if d.embedding]
    if lb.router == "smg" and embeddings:
        yield Violation(
            ("load_balancer", "router"),
            f"with router smg nothing sends /v1/embeddings to {embeddings[0].name!r}: smg "
            "balances the chat workers only",
            "set load_balancer.router: haproxy+smg (HAProxy sends embeddings to their engines, "
            "chat to smg)",
        )
    if lb.router == "smg" and lb.tls is not None and lb.open_webui:
        yield Violation(
            ("load_balancer", "open_webui"),
            "Open WebUI has no plain-HTTP API to call: with router smg and tls, smg is the only "
            "listener and serves HTTPS for the certificate's public name",
            "set load_balancer.router: haproxy+smg (HAProxy keeps a loopback port for Open "
            "WebUI), or drop tls or open_webui",
        )


@rule
def lab_is_consistent(spec: ClusterSpec) -> Iterator[Violation]:
    if (spec.provider.kind == "lab") != (spec.lab is not None):
        yield Violation(
            ("provider", "kind"),
            "provider kind 'lab' and a 'lab:' section go together",
            "lab specs set both; real clusters set neither",
        )
    if spec.lab is None:
        return
    networks = {n.name: n for n in spec.networks}
    network = networks.get(spec.lab.network)
    if network is None:
        yield Violation(
            ("lab", "network"),
            f"network {spec.lab.network!r} is not defined",
            _suggest(spec.lab.network, list(networks)),
        )
        return
    if spec.lab.host_address not in network.cidr:
        yield Violation(
            ("lab", "host_address"), f"{spec.lab.host_address} is outside {network.cidr}"
        )
    if any(n.address == spec.lab.host_address for n in spec.nodes):
        yield Violation(("lab", "host_address"), "the lab host address is also a node's address")


@rule
def engine_args_are_known(spec: ClusterSpec) -> Iterator[Violation]:
    """extra_args are checked against the pinned sglang's own flags (infra/sglang_flags.py)."""
    if not any(d.extra_args for d in spec.deployments):
        return  # specs without extra_args never need the sglang source
    # Imported here: infra.sglang imports infra.spec, which imports this module.
    from infra.sglang import MANAGED_FLAGS
    from infra.sglang_flags import engine_arg_problems, known_flags

    spellings = known_flags()
    for i, deployment in enumerate(spec.deployments):
        path: SpecPath = ("deployments", i, "extra_args")
        for problem in engine_arg_problems(deployment.extra_args, complete=False):
            at = (*path, problem.index) if problem.index is not None else path
            yield Violation(at, problem.message, problem.hint)
        for k, token in enumerate(deployment.extra_args):
            flag = spellings.get(token.partition("=")[0])
            if flag is not None and flag.dest in MANAGED_FLAGS:
                yield Violation(
                    (*path, k),
                    f"{token.partition('=')[0]} is set by deepfleet from the spec",
                    f"use {MANAGED_FLAGS[flag.dest]} instead of extra_args",
                )


# A stand-in for addresses only Pulumi knows (cloud nodes): the check reads the command's shape.
_PLACEHOLDER_ADDRESS = "192.0.2.1"
# The deployment setting each spec-derived engine flag comes from (by sglang dest), so that a
# bad rendered value points at the line to change; other flags point at the deployment.
_SETTING_OF_FLAG: dict[str, SpecPath] = {
    "tp_size": ("parallelism", "tp"),
    "dp_size": ("parallelism", "dp"),
    "attn_dp_size": ("parallelism", "dp"),
    "ep_size": ("parallelism", "ep"),
    "port": ("port",),
    "context_length": ("context_length",),
    "max_running_requests": ("max_running_requests",),
    "mem_fraction_static": ("mem_fraction_static",),
    "dist_timeout": ("dist_timeout_s",),
    "disaggregation_transfer_backend": ("disaggregation", "transfer_backend"),
    "disaggregation_bootstrap_port": ("disaggregation", "bootstrap_port"),
}


@rule
def engine_commands_are_valid(spec: ClusterSpec) -> Iterator[Violation]:
    """Every engine command the spec produces (infra/sglang.py) passes the pinned sglang's
    parser and our semantic checks, whenever the sglang source is installed.

    Spec fields are checked one by one elsewhere; this catches what only the assembled command
    shows (a value rendered out of range, flags that contradict each other), before a node
    starts an engine that exits on its arguments.
    """
    if not spec.deployments or not _launchable(spec):
        return
    # Imported here: infra.sglang imports infra.spec, which imports this module.
    from infra.sglang import launches_for_spec
    from infra.sglang_flags import SglangNotInstalled, engine_arg_problems, known_flags, sglang_root

    try:
        sglang_root()
    except SglangNotInstalled:
        return  # validation must work without the engine's source; tests and CI install it
    addresses = {n.name: _PLACEHOLDER_ADDRESS for n in spec.nodes if n.address is None}
    index = {d.name: i for i, d in enumerate(spec.deployments)}
    reported: set[tuple[str, str]] = set()
    for launch in launches_for_spec(spec, addresses):
        deployment = spec.deployments[index[launch.deployment]]
        # extra_args problems are engine_args_are_known's, pointed at the exact item there.
        own = {str(p) for p in engine_arg_problems(deployment.extra_args, complete=False)}
        for problem in engine_arg_problems(launch.engine_args):
            key = (launch.deployment, str(problem))
            if str(problem) in own or key in reported:
                continue
            reported.add(key)
            path: SpecPath = ("deployments", index[launch.deployment])
            if problem.index is not None:
                flag = known_flags().get(launch.engine_args[problem.index].partition("=")[0])
                path += _SETTING_OF_FLAG.get(flag.dest, ()) if flag else ()
            yield Violation(
                path,
                f"the engine command for replica {launch.replica} rank {launch.rank} "
                f"(node {launch.node!r}) is invalid: {problem.message}",
                problem.hint or "fix the spec value that produces this flag",
            )


def _launchable(spec: ClusterSpec) -> bool:
    """Whether infra/sglang.py can build every launch: the references it follows exist. Where
    they do not, the rules above report why."""
    nodes = {n.name for n in spec.nodes}
    models = {m.name: m for m in spec.models}
    storage = {s.name for s in spec.storage}
    for deployment in spec.deployments:
        model = models.get(deployment.model)
        if model is None or model.storage not in storage:
            return False
        if any(not replica or not set(replica) <= nodes for replica in deployment.replicas):
            return False
    return True
