"""Role `load_balancer`: the API's edge on the lb nodes (HAProxy, optional smg, VIP, Open WebUI).

HAProxy (`/etc/haproxy/haproxy.cfg`) listens on `load_balancer.port`, admits only
`allowed_cidrs`, terminates TLS when the spec asks, checks the API key, and balances
(`leastconn`, `GET /health` checks, per-server weights from each deployment's `weight`) over the
replicas' rank-0 engines. There is one backend per served model (the name each engine serves,
`--served-model-name`, is the model's `models[].name`): `chat` and `embeddings` when each kind has
one model, `chat-<model>` / `embeddings-<model>` when it has several. With several, the `model`
field of the request's JSON body picks the backend, an unknown or missing model gets a JSON
404/400 naming the models served, and HAProxy answers `GET /v1/models` itself with every model:
SGLang does not check the field, so a shared pool would answer with the wrong model. Its runtime
API (`/run/haproxy/admin.sock`) is what rolling restarts drain replicas through; its stats page
listens on the management address.

Secrets never enter a rendered file: haproxy.cfg compares the `Authorization` header with
`"Bearer ${DEEPFLEET_API_KEY}"`, an environment variable that a systemd drop-in loads from
`/etc/haproxy/deepfleet.env` (mode 600, written at apply time from the SecretRef); the TLS PEM is
uploaded the same way. With `router: haproxy+smg` HAProxy sends chat traffic to smg (cache-aware
routing, prefill/decode disaggregation) on loopback and embeddings to their engines; with
`router: smg` smg is the edge itself. Either way smg routes one chat model, and its metrics
listen where the monitoring role scrapes them (the node's management address).
"""

from __future__ import annotations

import io
import json
import shlex
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, pip, server, systemd

from infra.errors import UserError
from infra.inventory import node_addresses
from infra.render import HostFile, RolePlan, render
from infra.sglang import dist_timeout_s
from infra.spec import ClusterSpec, Deployment, LoadBalancer, Node, SecretRef
from roles import _converge as converge
from roles import _state
from roles._files import put_file
from roles._state import Probes
from roles.monitoring import SMG_METRICS_PORT
from roles.monitoring import management_address as monitored_address
from roles.sglang import (
    ADMIN_SOCKET,
    exec_line,
    hold_back_failed_replicas,
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

OPEN_WEBUI_IMAGE = "ghcr.io/open-webui/open-webui:v0.6.5"
OPEN_WEBUI_NAME = "deepfleet-open-webui"
OPEN_WEBUI_UNIT = f"/etc/systemd/system/{OPEN_WEBUI_NAME}.service"
OPEN_WEBUI_ENV = "/etc/deepfleet/open-webui.env"
OPEN_WEBUI_PORT = 8080
LOOPBACK_PORT = 18000
"""With TLS on the public port, local clients (Open WebUI) use plain HTTP on this loopback port."""

CHAT_PATHS = ("/v1/chat/completions", "/v1/completions")
EMBEDDING_PATHS = ("/v1/embeddings",)
BODY_BUFFER_BYTES = 1 << 20
"""HAProxy's buffer (`tune.bufsize`) when it routes by the body's `model` field: it reads the
field only from the part of the body that fits in one buffer, and the OpenAI SDKs send `model`
after `messages`. 1 MiB holds a 64k-token prompt even JSON-escaped; the cost is memory per
request in flight (two buffers each), which is why it is set only when routing needs it."""


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
    models: tuple[str, ...] = ()
    """The served model names (the requests' `model` field) this backend answers."""
    embedding: bool = False


@dataclass(frozen=True)
class ModelRoute:
    """One kind of request (chat or embeddings) whose backend the body's `model` field picks."""

    acl: str
    paths: tuple[str, ...]
    backends: tuple[Backend, ...]

    @property
    def served(self) -> list[str]:
        return [m for b in self.backends for m in b.models]

    @property
    def missing_reply(self) -> str:
        return _openai_error(
            'the request names no model: send a JSON body with a "model" field (within its '
            f"first {BODY_BUFFER_BYTES >> 20} MiB); this endpoint serves " + ", ".join(self.served),
            code=None,
        )

    @property
    def unknown_reply(self) -> str:
        """An HAProxy log-format string: the requested name, JSON-escaped, is filled in."""
        return _openai_error(
            f'model "{REQUESTED_MODEL}" is not served here; this endpoint serves '
            + ", ".join(self.served),
            code="model_not_found",
        )


REQUESTED_MODEL = "%[var(txn.model),json(utf8s)]"


def _openai_error(message: str, code: str | None) -> str:
    """OpenAI's error shape, which the SDKs turn into an exception carrying the message."""
    error = {"message": message, "type": "invalid_request_error", "param": "model", "code": code}
    return json.dumps({"error": error})


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


def served_model(spec: ClusterSpec, dep: Deployment) -> str:
    """The name a deployment's engines answer to (`--served-model-name`, infra/sglang.py)."""
    return spec.model(dep.model).name


def _model_backends(spec: ClusterSpec, deployments: list[Deployment], kind: str) -> list[Backend]:
    """One backend per served model: deployments of the same model share it (any of them
    answers correctly, weights set their shares); different models never share one."""
    by_model: dict[str, list[Deployment]] = {}
    for dep in deployments:
        by_model.setdefault(served_model(spec, dep), []).append(dep)
    several = len(by_model) > 1
    return [
        Backend(
            f"{kind}-{model}" if several else kind,
            replica_servers(spec, deps),
            (model,),
            embedding=kind == "embeddings",
        )
        for model, deps in by_model.items()
    ]


def backends(spec: ClusterSpec) -> list[Backend]:
    """HAProxy backends: the chat ones (or smg), then the embedding ones; see the module doc."""
    lb = _lb(spec)
    result: list[Backend] = []
    chat = chat_deployments(spec)
    if chat and lb.router == "haproxy+smg":
        # infra/spec_rules.router_serves_the_deployments allows one chat model behind smg: smg does not route by model.
        models = tuple(dict.fromkeys(served_model(spec, d) for d in chat))
        smg = Server("smg", "127.0.0.1", lb.router_port, 100, "SGLang model gateway")
        result.append(Backend("chat", [smg], models))
    elif chat:
        result += _model_backends(spec, chat, "chat")
    result += _model_backends(spec, embedding_deployments(spec), "embeddings")
    return result


def model_routes(found: list[Backend]) -> list[ModelRoute]:
    """The request kinds that need the body's `model` field: those served by several models.
    With one model per kind, every request of that kind goes to it, whatever it names."""
    routes = []
    for embedding, acl, paths in (
        (False, "chat_api", CHAT_PATHS),
        (True, "embeddings_api", EMBEDDING_PATHS),
    ):
        kind = tuple(b for b in found if b.embedding == embedding)
        if len(kind) > 1:
            routes.append(ModelRoute(acl, paths, kind))
    return routes


def models_reply(found: list[Backend]) -> str:
    """`GET /v1/models` in OpenAI's shape, listing every model the endpoint serves."""
    data = [
        {"id": model, "object": "model", "created": 0, "owned_by": "deepfleet"}
        for backend in found
        for model in backend.models
    ]
    return json.dumps({"object": "list", "data": data})


def _lb(spec: ClusterSpec) -> LoadBalancer:
    assert spec.load_balancer is not None
    return spec.load_balancer


def smg_metrics_host(spec: ClusterSpec, node: Node) -> str:
    """Where smg serves /metrics: the address Prometheus scrapes (roles.monitoring), or every
    address when the node is known by name only (a name may not resolve before base ran)."""
    address = monitored_address(spec, node)
    return "0.0.0.0" if address == node.name else address


def smg_args(spec: ClusterSpec, node: Node) -> list[str]:
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
    args += ["--prometheus-host", smg_metrics_host(spec, node)]
    args += ["--prometheus-port", str(SMG_METRICS_PORT)]
    if edge and lb.tls is not None:
        args += ["--tls-cert-path", TLS_PEM, "--tls-key-path", TLS_PEM]
    return args


def smg_exec_start(spec: ClusterSpec, node: Node) -> str:
    line = exec_line(smg_args(spec, node))
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
    routes = model_routes(found)
    embeddings = [b for b in found if b.embedding]
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
        buffer_bytes=BODY_BUFFER_BYTES if routes else None,
        routes=routes,
        model_paths=[path for route in routes for path in route.paths],
        # Engines list only their own model: with several, HAProxy answers for all of them.
        models_reply=models_reply(found) if sum(len(b.models) for b in found) > 1 else None,
        # One embedding model and a chat backend: /v1/embeddings by path, whatever it names.
        embeddings_backend=(
            embeddings[0].name if len(embeddings) == 1 and len(found) > 1 else None
        ),
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
        edge=edge_service(spec),
        vip=lb.vip,
        prefix=prefix,
        node_name=node.name,
        priority=150 - 10 * position,
        unicast_src=own if peers else None,
        peers=peers,
    )


def edge_service(spec: ClusterSpec) -> str:
    """The unit that serves the API port: smg with `router: smg`, else HAProxy."""
    return "deepfleet-smg.service" if _lb(spec).router == "smg" else "haproxy.service"


def open_webui_upstream(spec: ClusterSpec) -> str:
    """Where Open WebUI calls the API over loopback: HAProxy's plain loopback port when the public
    port is TLS (HAProxy binds it only then), else the public port, where HAProxy or smg listens
    on every address. smg with TLS has no plain listener: the spec rules reject it."""
    lb = _lb(spec)
    port = LOOPBACK_PORT if lb.tls is not None and lb.router != "smg" else lb.port
    return f"http://127.0.0.1:{port}/v1"


def open_webui_args(spec: ClusterSpec) -> list[str]:
    return [
        "docker", "run", "--rm", "--name", OPEN_WEBUI_NAME,
        "--network", "host",
        "-v", "deepfleet-open-webui:/app/backend/data",
        "--env-file", OPEN_WEBUI_ENV,
        "-e", f"PORT={OPEN_WEBUI_PORT}",
        "-e", f"OPENAI_API_BASE_URL={open_webui_upstream(spec)}",
        "-e", "ENABLE_OLLAMA_API=false",
        OPEN_WEBUI_IMAGE,
    ]  # fmt: skip


# --- plan --------------------------------------------------------------------------------------


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    lb = spec.load_balancer
    if lb is None or node.name not in lb.nodes:
        return None
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
            + "".join(
                f", POST {' '.join(r.paths)} by model ({', '.join(r.served)})"
                for r in model_routes(found)
            )
            + (", /v1/embeddings -> embeddings" if any(b.embedding for b in found[1:]) else "")
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
                    exec_start=smg_exec_start(spec, node),
                ),
            )
        )
        role.services.append("deepfleet-smg.service")
        role.summary.append(
            f"smg {SMG_VERSION} (PyPI) in {SMG_VENV}: {' '.join(smg_args(spec, node)[1:])}"
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
                    edge=edge_service(spec),
                    upstream=open_webui_upstream(spec),
                    exec_start=exec_line(open_webui_args(spec)),
                ),
            )
        )
        role.services.append(f"{OPEN_WEBUI_NAME}.service")
        role.summary.append(
            f"Open WebUI ({OPEN_WEBUI_IMAGE}) on :{OPEN_WEBUI_PORT}, API at {open_webui_upstream(spec)}"
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
    if any(f.path == HAPROXY_CFG for f in role.files):
        # After the config and its reload: a new replica's server exists only now.
        hold_back_failed_replicas(spec, node, ROLE)
