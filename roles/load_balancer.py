"""Role `load_balancer`: the API's edge on the lb nodes (HAProxy, optional smg, VIP, Open WebUI).

HAProxy (`/etc/haproxy/haproxy.cfg`) listens on `load_balancer.port`, admits only
`allowed_cidrs`, terminates TLS when the spec asks, checks the API key, and balances
(`leastconn`, `GET /health` checks, per-server weights from each deployment's `weight`) over the
replicas' rank-0 engines: `/v1/embeddings` goes to the embedding deployment when there is one,
everything else to the chat deployments. Its runtime API (`/run/haproxy/admin.sock`) is what
rolling restarts drain replicas through; its stats page listens on the management address.

Secrets never enter a rendered file: haproxy.cfg compares the `Authorization` header with
`"Bearer ${DEEPFLEET_API_KEY}"`, an environment variable that a systemd drop-in loads from
`/etc/haproxy/deepfleet.env` (mode 600, written at apply time from the SecretRef); the TLS PEM is
uploaded the same way. With `router: haproxy+smg` HAProxy sends chat traffic to smg (cache-aware
routing, prefill/decode disaggregation) on loopback; with `router: smg` smg is the edge itself.
"""

from __future__ import annotations

import io
import shlex
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, pip, server, systemd

from infra.errors import Problem, UserError
from infra.inventory import node_addresses
from infra.render import HostFile, RolePlan, render
from infra.sglang import dist_timeout_s
from infra.spec import ClusterSpec, Deployment, LoadBalancer, Node, SecretRef
from roles import _converge as converge
from roles import _state
from roles._files import put_file
from roles._state import Probes
from roles.sglang import (
    ADMIN_SOCKET,
    backend_name,
    exec_line,
    put_secret,
    secret_placeholder,
    server_name,
)

ROLE = "load_balancer"
HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
HAPROXY_ENV = "/etc/haproxy/deepfleet.env"
HAPROXY_DROPIN = "/etc/systemd/system/haproxy.service.d/deepfleet.conf"
TLS_PEM = "/etc/haproxy/certs/deepfleet-api.pem"
KEY_VARIABLE = "DEEPFLEET_API_KEY"
KEY_REFERENCE = "${" + KEY_VARIABLE + "}"
KEEPALIVED_CONF = "/etc/keepalived/keepalived.conf"
MAXCONN = 4096  # the lab's nofile hard limit is 20000; HAProxy needs ~2 fds per connection

SMG_VERSION = "1.13.0"
SMG_VENV = "/opt/deepfleet/smg"
SMG_UNIT = "/etc/systemd/system/deepfleet-smg.service"
SMG_ENV = "/etc/deepfleet/smg.env"
SMG_KEY_VARIABLE = "SMG_API_KEY"
SMG_METRICS_PORT = 29000

OPEN_WEBUI_IMAGE = "ghcr.io/open-webui/open-webui:v0.6.5"
OPEN_WEBUI_NAME = "deepfleet-open-webui"
OPEN_WEBUI_UNIT = f"/etc/systemd/system/{OPEN_WEBUI_NAME}.service"
OPEN_WEBUI_ENV = "/etc/deepfleet/open-webui.env"
OPEN_WEBUI_PORT = 8080
LOOPBACK_PORT = 18000
"""With TLS on the public port, local clients (Open WebUI) use plain HTTP on this loopback port."""


@dataclass(frozen=True)
class Server:
    name: str
    address: str
    port: int
    weight: int
    comment: str = ""

    @property
    def options(self) -> str:
        """A name (not an IP) is resolved at run time by the node's resolvers, never at start."""
        try:
            IPv4Address(self.address)
        except ValueError:
            return " resolvers node init-addr none"
        return ""


@dataclass
class Backend:
    name: str
    servers: list[Server] = field(default_factory=list)


# --- pure helpers --------------------------------------------------------------------------


def engine_address(spec: ClusterSpec, node: Node) -> str:
    """Where the LB reaches a node's engine: its serving-network address, else its management
    address, else its name (cloud nodes without a fixed address; HAProxy resolves it)."""
    networks = {n.name: n for n in spec.networks}
    for entry in node.addresses:
        if networks[entry.network].purpose == "serving":
            return str(entry.address)
    if node.address is not None:
        return str(node.address)
    # Cloud nodes: the address Pulumi reported (DEEPFLEET_OUTPUTS), else the node's name.
    return node_addresses(spec).get(node.name, node.name)


def management_address(spec: ClusterSpec, node: Node) -> str | None:
    return str(node.address) if node.address is not None else None


def chat_deployments(spec: ClusterSpec) -> list[Deployment]:
    return [d for d in spec.deployments if not d.embedding]


def embedding_deployments(spec: ClusterSpec) -> list[Deployment]:
    return [d for d in spec.deployments if d.embedding]


def replica_servers(spec: ClusterSpec, deployments: list[Deployment]) -> list[Server]:
    servers = []
    for dep in deployments:
        for number, replica in enumerate(dep.replicas, start=1):
            head = spec.node(replica[0])
            servers.append(
                Server(
                    name=server_name(dep, number),
                    address=engine_address(spec, head),
                    port=dep.port,
                    weight=dep.weight,
                    comment=f"{dep.name} replica {number} on {head.name}",
                )
            )
    return servers


def backends(spec: ClusterSpec) -> list[Backend]:
    """HAProxy backends: 'chat' (every chat deployment, or smg) and 'embeddings' if any."""
    lb = _lb(spec)
    result: list[Backend] = []
    chat = chat_deployments(spec)
    if chat:
        if lb.router == "haproxy+smg":
            servers = [Server("smg", "127.0.0.1", lb.router_port, 100, "SGLang model gateway")]
        else:
            servers = replica_servers(spec, chat)
        result.append(Backend(backend_name(chat[0]), servers))
    embeddings = embedding_deployments(spec)
    if embeddings:
        result.append(Backend(backend_name(embeddings[0]), replica_servers(spec, embeddings)))
    return result


def _lb(spec: ClusterSpec) -> LoadBalancer:
    assert spec.load_balancer is not None
    return spec.load_balancer


def check_router(spec: ClusterSpec) -> None:
    """Prefill/decode disaggregation needs a PD-aware router (smg); HAProxy alone cannot."""
    lb = _lb(spec)
    pd = [d for d in chat_deployments(spec) if d.disaggregation is not None]
    problems = []
    if pd and lb.router == "haproxy":
        problems.append(
            Problem(
                f"deployment {pd[0].name!r} disaggregates prefill and decode, which only the "
                "smg router can pair",
                path="load_balancer.router",
                hint="set load_balancer.router: haproxy+smg",
            )
        )
    if pd and len(pd) != len(chat_deployments(spec)):
        problems.append(
            Problem(
                "one smg instance routes either prefill/decode pairs or plain workers, not both",
                path="deployments",
                hint="disaggregate every chat deployment, or none",
            )
        )
    if problems:
        raise UserError("the load balancer cannot route these deployments", problems)


def smg_args(spec: ClusterSpec) -> list[str]:
    """`smg launch ...` for the chat deployments (flags of smg 1.13.0, `smg launch --help`)."""
    lb = _lb(spec)
    edge = lb.router == "smg"
    args = [f"{SMG_VENV}/bin/smg", "launch"]
    args += ["--host", "0.0.0.0" if edge else "127.0.0.1"]
    args += ["--port", str(lb.port if edge else lb.router_port)]
    args += ["--policy", "cache_aware"]
    chat = chat_deployments(spec)
    pd = [d for d in chat if d.disaggregation is not None]
    if pd:
        args.append("--pd-disaggregation")
        for dep in pd:
            assert dep.disaggregation is not None
            for number, replica in enumerate(dep.replicas, start=1):
                url = f"http://{engine_address(spec, spec.node(replica[0]))}:{dep.port}"
                if number in dep.disaggregation.prefill_replicas:
                    args += ["--prefill", url, str(dep.disaggregation.bootstrap_port)]
                else:
                    args += ["--decode", url]
    else:
        args.append("--worker-urls")
        args += [f"http://{s.address}:{s.port}" for s in replica_servers(spec, chat)]
    startup = max((dist_timeout_s(d, spec.model(d.model)) for d in chat), default=1800)
    args += ["--worker-startup-timeout-secs", str(startup)]
    args += ["--request-timeout-secs", str(lb.timeout_s)]
    args += ["--health-check-endpoint", "/health"]
    args += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(SMG_METRICS_PORT)]
    if edge and lb.tls is not None:
        args += ["--tls-cert-path", TLS_PEM, "--tls-key-path", TLS_PEM]
    return args


def smg_exec_start(spec: ClusterSpec) -> str:
    line = exec_line(smg_args(spec))
    if _smg_key(spec) is not None:
        # systemd substitutes the value from the EnvironmentFile; the unit holds only the name.
        line += f" \\\n    --api-key ${{{SMG_KEY_VARIABLE}}}"
    return line


def _smg_key(spec: ClusterSpec) -> SecretRef | None:
    chat = chat_deployments(spec)
    return next((d.api_key for d in chat if d.api_key is not None), None)


def render_haproxy(spec: ClusterSpec, node: Node) -> str:
    lb = _lb(spec)
    found = backends(spec)
    names = [b.name for b in found]
    allowed = [str(c) for c in lb.allowed_cidrs]
    extra_binds = []
    if lb.open_webui:
        allowed.append("127.0.0.0/8")  # Open WebUI on this node calls the API over loopback
        if lb.tls is not None:
            extra_binds.append(f"127.0.0.1:{LOOPBACK_PORT}")
    bind = f":{lb.port}"
    if lb.tls is not None:
        bind += f" ssl crt {TLS_PEM} alpn h2,http/1.1"
    stats_address = management_address(spec, node)
    summary = (
        f"{sum(len(b.servers) for b in found)} server(s) in {', '.join(names)}, router {lb.router}"
    )
    return render(
        "load_balancer/haproxy.cfg.j2",
        summary=summary,
        api_key=lb.api_key is not None,
        key_reference=KEY_REFERENCE,
        env_file=HAPROXY_ENV,
        maxconn=MAXCONN,
        admin_socket=ADMIN_SOCKET,
        tls=lb.tls is not None,
        timeout_s=lb.timeout_s,
        bind=bind,
        extra_binds=extra_binds,
        allowed_cidrs=allowed,
        embeddings_backend="embeddings" if "embeddings" in names and "chat" in names else None,
        default_backend=names[0],
        backends=found,
        resolvers=any(srv.options for b in found for srv in b.servers),
        stats_bind=f"{stats_address or ''}:{lb.stats_port}",
        admin_cidrs=[str(c) for c in spec.site.admin_cidrs],
    )


def render_keepalived(spec: ClusterSpec, node: Node) -> str:
    lb = _lb(spec)
    assert lb.vip is not None
    prefix = next((n.cidr.prefixlen for n in spec.networks if lb.vip.address in n.cidr), 32)
    position = lb.nodes.index(node.name)
    own = management_address(spec, node)
    peers = [
        a
        for name in lb.nodes
        if name != node.name and (a := management_address(spec, spec.node(name))) is not None
    ]
    return render(
        "load_balancer/keepalived.conf.j2",
        vip=lb.vip,
        prefix=prefix,
        node_name=node.name,
        priority=150 - 10 * position,
        unicast_src=own if peers else None,
        peers=peers,
    )


def open_webui_args(spec: ClusterSpec) -> list[str]:
    lb = _lb(spec)
    port = LOOPBACK_PORT if lb.tls is not None else lb.port
    return [
        "docker", "run", "--rm", "--name", OPEN_WEBUI_NAME,
        "--network", "host",
        "-v", "deepfleet-open-webui:/app/backend/data",
        "--env-file", OPEN_WEBUI_ENV,
        "-e", f"PORT={OPEN_WEBUI_PORT}",
        "-e", f"OPENAI_API_BASE_URL=http://127.0.0.1:{port}/v1",
        "-e", "ENABLE_OLLAMA_API=false",
        OPEN_WEBUI_IMAGE,
    ]  # fmt: skip


# --- plan --------------------------------------------------------------------------------------


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    lb = spec.load_balancer
    if lb is None or node.name not in lb.nodes:
        return None
    check_router(spec)
    role = RolePlan(role=ROLE)
    uses_haproxy = lb.router != "smg" and bool(spec.deployments)
    if uses_haproxy:
        role.packages.append("haproxy")
        role.services.append("haproxy.service")
        role.files.append(HostFile(HAPROXY_CFG, render_haproxy(spec, node)))
        found = backends(spec)
        for backend in found:
            weights = ", ".join(f"{s.name}={s.weight}" for s in backend.servers)
            role.summary.append(f"haproxy backend {backend.name}: {weights} (leastconn)")
        scheme = "https" if lb.tls else "http"
        role.summary.append(
            f"{HAPROXY_CFG}: {scheme} on :{lb.port} for {', '.join(map(str, lb.allowed_cidrs))}"
            + (", /v1/embeddings -> embeddings" if len(found) > 1 else "")
            + f", stats on {management_address(spec, node) or '*'}:{lb.stats_port}"
        )
    if lb.api_key is not None and uses_haproxy:
        role.files.append(
            HostFile(
                HAPROXY_DROPIN,
                render(
                    "load_balancer/haproxy-dropin.conf.j2",
                    key_reference=KEY_REFERENCE,
                    env_file=HAPROXY_ENV,
                ),
            )
        )
        role.summary.append(
            f"{HAPROXY_ENV} (600): {KEY_VARIABLE}={secret_placeholder(lb.api_key)}, "
            "written at apply time, never planned"
        )
    different = [
        d.name
        for d in spec.deployments
        if d.api_key is not None and lb.api_key is not None and d.api_key != lb.api_key
    ]
    if different and lb.router == "haproxy":
        role.summary.append(
            "WARNING: HAProxy forwards the client's Authorization header unchanged, and "
            f"{', '.join(different)} expect(s) another key than load_balancer.api_key: "
            "use the same SecretRef for both"
        )
    if lb.tls is not None:
        role.summary.append(
            f"{TLS_PEM} (600): {secret_placeholder(lb.tls.certificate)}, written at apply time"
        )
    if lb.router != "haproxy" and chat_deployments(spec):
        smg_key = _smg_key(spec)
        role.files.append(
            HostFile(
                SMG_UNIT,
                render(
                    "load_balancer/smg.service.j2",
                    version=SMG_VERSION,
                    venv=SMG_VENV,
                    mode=(
                        "prefill/decode pairs"
                        if any(d.disaggregation for d in chat_deployments(spec))
                        else "cache-aware routing"
                    ),
                    env_file=SMG_ENV if smg_key is not None else None,
                    exec_start=smg_exec_start(spec),
                ),
            )
        )
        role.services.append("deepfleet-smg.service")
        role.summary.append(
            f"smg {SMG_VERSION} (PyPI) in {SMG_VENV}: {' '.join(smg_args(spec)[1:])}"
        )
        if lb.router == "smg":
            role.summary.append(
                "WARNING: router smg is the edge itself: allowed_cidrs are not enforced on the "
                "node (use haproxy+smg, or a site firewall / security group)"
            )
    if lb.vip is not None:
        role.packages.append("keepalived")
        role.services.append("keepalived.service")
        role.files.append(HostFile(KEEPALIVED_CONF, render_keepalived(spec, node)))
        role.summary.append(f"keepalived: VIP {lb.vip.address} on {lb.vip.interface}")
    if lb.open_webui:
        role.files.append(
            HostFile(
                OPEN_WEBUI_UNIT,
                render(
                    "load_balancer/open-webui.service.j2",
                    name=OPEN_WEBUI_NAME,
                    exec_start=exec_line(open_webui_args(spec)),
                ),
            )
        )
        role.services.append(f"{OPEN_WEBUI_NAME}.service")
        role.summary.append(
            f"Open WebUI ({OPEN_WEBUI_IMAGE}) on :{OPEN_WEBUI_PORT}, using the API over loopback"
        )
    return role


# --- apply -------------------------------------------------------------------------------------


def systemd_env_line(name: str, value: str) -> str:
    """`NAME="value"` for a systemd EnvironmentFile (quotes, backslashes and $ escaped)."""
    if "\n" in value or "\r" in value:
        raise UserError(f"the secret for {name} has a line break", [])
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'{name}="{escaped}"\n'


def _planned(role: RolePlan, path: str) -> HostFile:
    return next(f for f in role.files if f.path == path)


def _changed(ops: list[OperationMeta]) -> bool:
    return any(op.is_complete() and op.did_change() for op in ops)


def _haproxy(spec: ClusterSpec, role: RolePlan) -> None:
    lb = _lb(spec)
    restart_on: list[OperationMeta] = []
    reload_on: list[OperationMeta] = []
    if lb.api_key is not None:
        restart_on.append(
            put_secret(
                role=ROLE,
                path=HAPROXY_ENV,
                ref=lb.api_key,
                content=lambda value: (
                    "# Managed by deepfleet at deploy time.\n"
                    + systemd_env_line(KEY_VARIABLE, value)
                ),
            )
        )
        dropin = put_file(_planned(role, HAPROXY_DROPIN), ROLE)
        restart_on.append(dropin)
        systemd.daemon_reload(
            name=f"[{ROLE}] Reload systemd units (haproxy drop-in)",
            _if=lambda: _changed([dropin]),
        )
    if lb.tls is not None:
        converge.directory(
            name=f"[{ROLE}] Create /etc/haproxy/certs", path="/etc/haproxy/certs", mode="700"
        )
        reload_on.append(
            put_secret(role=ROLE, path=TLS_PEM, ref=lb.tls.certificate, content=lambda v: v + "\n")
        )
    reload_on.append(put_file(_planned(role, HAPROXY_CFG), ROLE))
    converge.service(
        name=f"[{ROLE}] Start and enable haproxy",
        service="haproxy.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"[{ROLE}] Restart haproxy (its environment changed: API key)",
        service="haproxy.service",
        restarted=True,
        _if=lambda: _changed(restart_on),
    )
    systemd.service(
        name=f"[{ROLE}] Reload haproxy (config or certificate changed)",
        service="haproxy.service",
        reloaded=True,
        _if=lambda: _changed(reload_on) and not _changed(restart_on),
    )


def _smg(spec: ClusterSpec, role: RolePlan) -> None:
    converge.packages(name=f"[{ROLE}] Install python3-venv (for smg)", packages=["python3-venv"])
    changes = [
        pip.venv(name=f"[{ROLE}] Create the smg virtualenv {SMG_VENV}", path=SMG_VENV),
        pip.packages(
            name=f"[{ROLE}] Install smg=={SMG_VERSION} from PyPI",
            packages=[f"smg=={SMG_VERSION}"],
            virtualenv=SMG_VENV,
        ),
    ]
    key = _smg_key(spec)
    if key is not None:
        changes.append(
            put_secret(
                role=ROLE,
                path=SMG_ENV,
                ref=key,
                content=lambda value: systemd_env_line(SMG_KEY_VARIABLE, value),
            )
        )
    unit = put_file(_planned(role, SMG_UNIT), ROLE)
    changes.append(unit)
    systemd.daemon_reload(name=f"[{ROLE}] Reload systemd units (smg)", _if=lambda: _changed([unit]))
    converge.service(
        name=f"[{ROLE}] Start and enable deepfleet-smg",
        service="deepfleet-smg.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"[{ROLE}] Restart deepfleet-smg (unit, version or key changed)",
        service="deepfleet-smg.service",
        restarted=True,
        _if=lambda: _changed(changes),
    )


def _keepalived(role: RolePlan) -> None:
    conf = put_file(_planned(role, KEEPALIVED_CONF), ROLE)
    converge.service(
        name=f"[{ROLE}] Start and enable keepalived",
        service="keepalived.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"[{ROLE}] Reload keepalived (config changed)",
        service="keepalived.service",
        reloaded=True,
        _if=lambda: _changed([conf]),
    )


def _open_webui(spec: ClusterSpec, role: RolePlan) -> None:
    lb = _lb(spec)
    changes: list[OperationMeta] = []
    if _state.docker_image(OPEN_WEBUI_IMAGE) is None:
        changes.append(
            server.shell(
                name=f"[{ROLE}] Pull image {OPEN_WEBUI_IMAGE}",
                commands=[f"docker pull {shlex.quote(OPEN_WEBUI_IMAGE)}"],
            )
        )
    converge.directory(name=f"[{ROLE}] Create /etc/deepfleet", path="/etc/deepfleet", mode="755")
    if lb.api_key is not None:
        changes.append(
            put_secret(
                role=ROLE,
                path=OPEN_WEBUI_ENV,
                ref=lb.api_key,
                content=lambda value: f"OPENAI_API_KEY={value}\n",
            )
        )
    else:
        changes.append(
            files.put(
                name=f"[{ROLE}] Install {OPEN_WEBUI_ENV} (no API key in the spec)",
                src=io.StringIO("# no API key\n"),
                dest=OPEN_WEBUI_ENV,
                mode="600",
            )
        )
    unit = put_file(_planned(role, OPEN_WEBUI_UNIT), ROLE)
    changes.append(unit)
    systemd.daemon_reload(
        name=f"[{ROLE}] Reload systemd units (Open WebUI)", _if=lambda: _changed([unit])
    )
    converge.service(
        name=f"[{ROLE}] Start and enable {OPEN_WEBUI_NAME}",
        service=f"{OPEN_WEBUI_NAME}.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"[{ROLE}] Restart {OPEN_WEBUI_NAME} (unit, image or key changed)",
        service=f"{OPEN_WEBUI_NAME}.service",
        restarted=True,
        _if=lambda: _changed(changes),
    )


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(
        paths=(
            HAPROXY_ENV,
            TLS_PEM,
            SMG_ENV,
            OPEN_WEBUI_ENV,
            "/etc/haproxy/certs",
            "/etc/deepfleet",
        ),
        units=(
            "haproxy.service",
            "deepfleet-smg.service",
            "keepalived.service",
            f"{OPEN_WEBUI_NAME}.service",
        ),
        images=(OPEN_WEBUI_IMAGE,) if spec.load_balancer and spec.load_balancer.open_webui else (),
    )


@deploy("Load balancer (HAProxy)")
def apply(spec: ClusterSpec, node: Node) -> None:
    role = plan(spec, node)
    if role is None:
        return
    lb = _lb(spec)
    if role.packages:
        converge.packages(
            name=f"[{ROLE}] Install {', '.join(role.packages)}", packages=role.packages
        )
    if lb.router != "haproxy" and chat_deployments(spec):
        _smg(spec, role)
    if any(f.path == HAPROXY_CFG for f in role.files):
        _haproxy(spec, role)
    elif lb.tls is not None:
        converge.directory(
            name=f"[{ROLE}] Create /etc/haproxy/certs", path="/etc/haproxy/certs", mode="700"
        )
        put_secret(role=ROLE, path=TLS_PEM, ref=lb.tls.certificate, content=lambda v: v + "\n")
    if lb.vip is not None:
        _keepalived(role)
    if lb.open_webui:
        _open_webui(spec, role)
