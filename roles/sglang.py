"""Role `sglang`: the serving engines, one systemd unit per engine, and rolling restarts.

Every `EngineLaunch` of a node (built by `infra.sglang` from the spec) becomes a unit
`/etc/systemd/system/<unit>.service` that runs the engine container in the foreground
(`docker run --rm --name <unit> ...`, output to the journal). The deployment's API key lives in
`/etc/deepfleet/<deployment>.env` (mode 600): its value is read on the controller from the
spec's SecretRef when the deploy runs and uploaded by its own operation; it is never a planned
file, so it is in no plan, golden file or `deepfleet plan --out`, and pyinfra's checksum
comparison keeps an unchanged key from showing as drift. The image is pinned by digest and
pulled (or loaded from a tarball in /var/cache/deepfleet/images) only when the node lacks it;
the lab loads the stand-in archive built on the controller.

Restarts are rolling (docs/serving.md): `rolling_restart_plan` orders, for every replica in turn,
"take it out of HAProxy (drain)", "restart all its ranks", "wait for /health_generate on rank 0",
"put it back". Every host the role runs on (GPU nodes and load-balancer nodes) calls the same
operations in the same order through `host.loop`, so pyinfra gives them one shared order: the
next replica's drain only starts when the previous replica is serving again. Each step acts only
on the hosts it names and only when that replica changed (`_if`, evaluated at run time).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta, operation
from pyinfra.context import ctx_state
from pyinfra.operations import files, server, systemd

from facts import roce_gid
from facts.engine import container_differences, expected_container
from infra.errors import Problem, UserError
from infra.inventory import PROJECT_DIR
from infra.render import HostFile, RolePlan, render
from infra.sglang import (
    API_KEY_VARIABLE,
    GID_INDEX_VARIABLE,
    NCCL_ENV_DIR,
    NCCL_ENV_SCRIPT,
    EngineLaunch,
    dist_timeout_s,
    env_file_path,
    launches_for_node,
)
from infra.spec import ClusterSpec, Deployment, Node, SecretRef
from roles import _converge as converge
from roles import _gate, _state
from roles._files import put_file
from roles._state import Probes

ROLE = "sglang"
UNIT_DIR = "/etc/systemd/system"
READY_SCRIPT = "/usr/local/sbin/deepfleet-engine-ready"
HAPROXY_SCRIPT = "/usr/local/sbin/deepfleet-haproxy-server"
ADMIN_SOCKET = "/run/haproxy/admin.sock"
IMAGE_CACHE = "/var/cache/deepfleet/images"
"""Node directory for image tarballs: air-gapped sites drop `<image slug>.tar` here and the
role loads it instead of pulling; the lab uploads the stand-in archive here."""
NCCL_ENV_SOURCE = Path(roce_gid.__file__)
"""Installed as NCCL_ENV_SCRIPT: the same selection the mellanox role's check makes."""
STOP_SECONDS = 30
RESTART_SECONDS = 10
READY_INTERVAL_SECONDS = 5
DRAIN_WAIT_MAX_SECONDS = 300
"""A drained replica gets at most this long to finish its in-flight requests (streams)."""

# --- secrets ---------------------------------------------------------------------------------


def secret_placeholder(ref: SecretRef) -> str:
    """What plans show instead of a secret's value."""
    return f"<secret from {ref.describe()}>"


def resolve_secret(ref: SecretRef, base: Path = PROJECT_DIR) -> str | None:
    """The secret's value on the controller (env var, or file relative to the project), or None.

    Called only while a deploy runs (apply), never by `plan`.
    """
    if ref.env is not None:
        value = os.environ.get(ref.env)
    else:
        path = Path(str(ref.file)).expanduser()
        path = path if path.is_absolute() else base / path
        value = path.read_text(encoding="utf-8") if path.is_file() else None
    if value is None:
        return None
    value = value.strip()
    return value or None


def env_line(name: str, value: str) -> str:
    """One `NAME=value` line for docker --env-file (no quoting: docker takes the rest literally)."""
    if "\n" in value or "\r" in value:
        raise UserError(f"the secret for {name} has a line break", [])
    return f"{name}={value}\n"


def put_secret(
    *, role: str, path: str, ref: SecretRef, content: Callable[[str], str], mode: str = "600"
) -> OperationMeta:
    """Upload a file holding a secret, with content computed only here, at apply time.

    The operation's name deliberately does not match drift's "[role] Write /path" pattern, so
    drift never fetches and diffs the node's copy. A secret the controller does not have makes
    an operation that fails the deploy with the reason (and shows as drift in a dry run: the
    key cannot be checked).
    """
    value = resolve_secret(ref)
    if value is None:
        missing = (
            f"environment variable {ref.env} is not set"
            if ref.env
            else f"file {ref.file} does not exist (relative paths: from {PROJECT_DIR})"
        )
        return server.shell(
            name=f"[{role}] Install secret {path} from {ref.describe()}: MISSING on the controller",
            commands=[
                f"echo {shlex.quote(f'deepfleet: {missing}; cannot write {path}')} >&2; exit 1"
            ],
        )
    return put_file(
        HostFile(path, content(value), mode=mode),
        role,
        name=f"[{role}] Install secret {path} from {ref.describe()}",
    )


# --- units -------------------------------------------------------------------------------------

_SYSTEMD_SAFE = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")


def systemd_quote(argument: str) -> str:
    """Quote one argument for an Exec*= line: `%` and `$` escaped, C-style double quotes."""
    escaped = argument.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_SAFE.match(argument):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def exec_line(args: Sequence[str]) -> str:
    """A long command as a systemd Exec line: one option (with its value) per line."""
    args = list(args)
    if args and args[0] == "docker":
        args[0] = "/usr/bin/docker"
    lines: list[list[str]] = [[]]
    for arg in args:
        if arg.startswith("-") and lines[-1] and len(lines) < 200:
            lines.append([])
        lines[-1].append(systemd_quote(arg))
    return " \\\n    ".join(" ".join(line) for line in lines)


def lab_container_args(args: Sequence[str]) -> list[str]:
    """The lab's docker run: no `--gpus` (no NVIDIA runtime: docker run would fail) and no
    `--ulimit memlock=-1` (lab nodes lack CAP_SYS_RESOURCE; their memlock hard limit is 8 MiB,
    which a container cannot raise). Everything else is production's line."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        value = args[i + 1] if i + 1 < len(args) else ""
        if arg == "--gpus" or (arg == "--ulimit" and value.startswith("memlock=")):
            skip = True
            continue
        if arg.startswith(("--gpus=", "--ulimit=memlock=")):
            continue
        out.append(arg)
    return out


def node_launches(spec: ClusterSpec, node: Node) -> list[EngineLaunch]:
    launches = launches_for_node(spec, node)
    if spec.is_lab:
        launches = [
            replace(launch, container_args=lab_container_args(launch.container_args))
            for launch in launches
        ]
    return launches


def deployment(spec: ClusterSpec, name: str) -> Deployment:
    return next(d for d in spec.deployments if d.name == name)


def render_unit(spec: ClusterSpec, launch: EngineLaunch) -> HostFile:
    dep = deployment(spec, launch.deployment)
    model = spec.model(dep.model)
    mounts = spec.storage_named(model.storage).mount_point
    return HostFile(
        f"{UNIT_DIR}/{launch.unit_name}.service",
        render(
            "sglang/engine.service.j2",
            launch=launch,
            lab=spec.is_lab,
            mounts=mounts,
            exec_start=exec_line(launch.container_args),
            nccl_env_probe=exec_line(launch.nccl_env_command) if launch.nccl_env_command else "",
            stop_seconds=STOP_SECONDS,
            restart_seconds=RESTART_SECONDS,
            start_timeout=900,
        ),
    )


def image_archive_name(image: str) -> str:
    """The tarball an air-gapped site puts in IMAGE_CACHE for an image reference."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", image.split("@")[0]) + ".tar"


def pull_or_load(image: str) -> str:
    archive = f"{IMAGE_CACHE}/{image_archive_name(image)}"
    return (
        f"if [ -f {shlex.quote(archive)} ]; then docker load -i {shlex.quote(archive)}; "
        f"else docker pull {shlex.quote(image)}; fi"
    )


# --- rolling restarts (pure) -------------------------------------------------------------------

Action = Literal["drain", "restart", "wait", "ready"]


@dataclass(frozen=True)
class RollingStep:
    """One step of a rolling restart: which hosts run which commands."""

    deployment: str
    replica: int
    action: Action
    name: str
    commands: dict[str, list[str]] = field(default_factory=dict)


def backend_name(dep: Deployment) -> str:
    """The HAProxy backend a deployment's replicas are servers of."""
    return "embeddings" if dep.embedding else "chat"


def server_name(dep: Deployment, replica: int) -> str:
    return f"{dep.name}-r{replica}"


def haproxy_drains(spec: ClusterSpec, dep: Deployment) -> bool:
    """Whether HAProxy itself balances the replicas (not smg, which has its own health checks).
    With haproxy+smg, smg gets the chat workers only: embedding replicas stay HAProxy's."""
    lb = spec.load_balancer
    if lb is None or dep.disaggregation is not None:
        return False
    return lb.router == "haproxy" or (lb.router == "haproxy+smg" and dep.embedding)


LAB_READY_TIMEOUT_S = 120


def replica_nodes(spec: ClusterSpec, deployment: str, number: int) -> list[str]:
    dep = next(d for d in spec.deployments if d.name == deployment)
    return list(dep.replicas[number - 1])


def rolling_restart_plan(spec: ClusterSpec) -> list[RollingStep]:
    """Every replica of every deployment, one after the other: drain, restart, wait, ready.

    Never two replicas out at once: a replica goes back into rotation before the next is
    drained. Multi-node replicas restart all their ranks in the same step and wait on rank 0.
    """
    steps: list[RollingStep] = []
    lb_nodes = list(spec.load_balancer.nodes) if spec.load_balancer else []
    timeout_s = spec.load_balancer.timeout_s if spec.load_balancer else 0
    drain_wait = min(timeout_s, DRAIN_WAIT_MAX_SECONDS)
    launches = [launch for n in spec.nodes for launch in node_launches(spec, n)]
    for dep in spec.deployments:
        model = spec.model(dep.model)
        # The lab's stand-in loads no weights: waiting an hour for it would only hide a failure.
        ready_timeout = LAB_READY_TIMEOUT_S if spec.is_lab else dist_timeout_s(dep, model)
        for number, replica in enumerate(dep.replicas, start=1):
            target = f"{backend_name(dep)}/{server_name(dep, number)}"
            units = {
                launch.node: launch.unit_name
                for launch in launches
                if launch.deployment == dep.name and launch.replica == number
            }
            drains = haproxy_drains(spec, dep)
            if drains:
                steps.append(
                    RollingStep(
                        dep.name,
                        number,
                        "drain",
                        f"[sglang] Take {dep.name} replica {number} out of the load balancer",
                        {lb: [f"{HAPROXY_SCRIPT} drain {target} {drain_wait}"] for lb in lb_nodes},
                    )
                )
            steps.append(
                RollingStep(
                    dep.name,
                    number,
                    "restart",
                    f"[sglang] Restart {dep.name} replica {number} (every rank)",
                    {n: [f"systemctl restart {units[n]}.service"] for n in replica},
                )
            )
            steps.append(
                RollingStep(
                    dep.name,
                    number,
                    "wait",
                    f"[sglang] Wait until {dep.name} replica {number} serves "
                    f"(/health_generate, at most {ready_timeout} s)",
                    {
                        replica[0]: [
                            f"{READY_SCRIPT} http://127.0.0.1:{dep.port}/health_generate "
                            f"{ready_timeout} {units[replica[0]]}.service"
                        ]
                    },
                )
            )
            if drains:
                steps.append(
                    RollingStep(
                        dep.name,
                        number,
                        "ready",
                        f"[sglang] Put {dep.name} replica {number} back into the load balancer",
                        {lb: [f"{HAPROXY_SCRIPT} ready {target}"] for lb in lb_nodes},
                    )
                )
    return steps


# --- plan --------------------------------------------------------------------------------------


def _is_lb(spec: ClusterSpec, node: Node) -> bool:
    return (
        spec.load_balancer is not None
        and node.name in spec.load_balancer.nodes
        and bool(spec.deployments)
    )


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    launches = node_launches(spec, node)
    is_lb = _is_lb(spec, node)
    if not launches and not is_lb:
        return None
    role = RolePlan(role=ROLE)
    if is_lb:
        role.files.append(
            HostFile(
                HAPROXY_SCRIPT,
                render("sglang/deepfleet-haproxy-server.py.j2", socket=ADMIN_SOCKET),
                mode="755",
            )
        )
        role.summary.append(
            f"{HAPROXY_SCRIPT}: drains and returns replicas over {ADMIN_SOCKET} "
            "during rolling restarts"
        )
    if not launches:
        return role
    role.files.append(
        HostFile(
            READY_SCRIPT,
            render("sglang/deepfleet-engine-ready.py.j2", interval=READY_INTERVAL_SECONDS),
            mode="755",
        )
    )
    if any(launch.nccl_env_command for launch in launches):
        role.files.append(HostFile(NCCL_ENV_SCRIPT, NCCL_ENV_SOURCE.read_text(), mode="755"))
        role.summary.append(
            f"{NCCL_ENV_SCRIPT}: each RoCE engine's unit runs it before the container starts; it "
            f"writes {GID_INDEX_VARIABLE} from the node's GID table to {NCCL_ENV_DIR}/<unit>.nccl.env"
        )
    for launch in launches:
        role.files.append(render_unit(spec, launch))
        role.services.append(f"{launch.unit_name}.service")
        role.summary.append(
            f"{launch.unit_name}.service: {launch.deployment} replica {launch.replica} rank "
            f"{launch.rank} ({launch.role}), image {deployment(spec, launch.deployment).image}"
        )
    for dep_name in sorted({launch.deployment for launch in launches}):
        dep = deployment(spec, dep_name)
        if dep.api_key is None:
            role.summary.append(f"{dep.name}: no API key in the spec (no env file)")
        else:
            role.summary.append(
                f"{env_file_path(dep)} (600): {API_KEY_VARIABLE}={secret_placeholder(dep.api_key)}, "
                "written at apply time, never planned"
            )
        if "@sha256:" not in dep.image and not spec.is_lab:
            role.summary.append(f"WARNING: {dep.name}'s image {dep.image} is not pinned by digest")
    if spec.is_lab:
        role.summary.append(
            "lab: image = the SGLang stand-in archive (built on the controller by "
            "build_standin_image, uploaded to "
            f"{IMAGE_CACHE}, docker load); no --gpus all (no NVIDIA runtime) and no "
            "--ulimit memlock=-1 (no CAP_SYS_RESOURCE) in the lab"
        )
    else:
        role.summary.append(
            f"image: docker pull by digest, or docker load from {IMAGE_CACHE}/<image>.tar, "
            "only when the node lacks it"
        )
    role.summary.append(
        "rolling restart on change: drain in HAProxy, restart every rank, wait for "
        "/health_generate, put back; one replica at a time"
    )
    return role


# --- apply -------------------------------------------------------------------------------------

ReplicaKey = tuple[int, str, int]
# Operations (per replica) whose change means the replica must restart, from every host of the
# cluster: the load balancer's drain step reads the GPU hosts' results at run time.
_CHANGES: dict[ReplicaKey, list[OperationMeta]] = {}
_FORCED: dict[ReplicaKey, list[str]] = {}
_STARTED: dict[ReplicaKey, list[OperationMeta]] = {}


def _key(dep: str, replica: int) -> ReplicaKey:
    return (id(ctx_state.get()), dep, replica)  # type: ignore[no-untyped-call]


def _did_change(ops: Sequence[OperationMeta]) -> bool:
    return any(op.is_complete() and op.did_change() for op in ops)


def replica_changed(dep: str, replica: int) -> bool:
    key = _key(dep, replica)
    return bool(_FORCED.get(key)) or _did_change(_CHANGES.get(key, []))


def replica_started(dep: str, replica: int) -> bool:
    return _did_change(_STARTED.get(_key(dep, replica), []))


def _install_image(
    spec: ClusterSpec, launches: Sequence[EngineLaunch], image_ids: dict[str, str | None]
) -> list[OperationMeta]:
    """Pull or load the images; records each image's id as found in `image_ids`, so the
    engine checks reuse it instead of asking the node again."""
    images = sorted({deployment(spec, launch.deployment).image for launch in launches})
    ops: list[OperationMeta] = []
    if spec.is_lab:
        # Built on the controller (needs root and mmdebstrap there); cached by its inputs.
        from infra.standin.image import build_standin_image

        archive = build_standin_image()
        wrong = [image for image in images if image != archive.repo_tag]
        if wrong:
            raise UserError(
                "lab deployments must use the stand-in image",
                [
                    Problem(
                        f"image {image} is not the stand-in's {archive.repo_tag}",
                        path="deployments[].image",
                        hint=f"set image: {archive.repo_tag} in the lab spec",
                    )
                    for image in wrong
                ],
            )
        present = _state.docker_image(archive.repo_tag)
        image_ids[archive.repo_tag] = present.id if present else None
        if present is None or present.id != archive.image_id:
            dest = f"{IMAGE_CACHE}/{archive.path.name}"
            converge.directory(name=f"[{ROLE}] Create {IMAGE_CACHE}", path=IMAGE_CACHE, mode="700")
            files.put(
                name=f"[{ROLE}] Upload the stand-in image archive {archive.path.name}",
                src=str(archive.path),
                dest=dest,
                mode="600",
            )
            ops.append(
                server.shell(
                    name=f"[{ROLE}] Load image {archive.repo_tag} ({archive.image_id[:19]})",
                    commands=[f"docker load -i {shlex.quote(dest)}"],
                )
            )
        return ops
    for image in images:
        found = _state.docker_image(image)
        image_ids[image] = found.id if found else None
        if found is None:
            ops.append(
                server.shell(
                    name=f"[{ROLE}] Pull image {image}",
                    commands=[pull_or_load(image)],
                )
            )
    return ops


def _install_engines(spec: ClusterSpec, node: Node, role: RolePlan) -> None:
    launches = node_launches(spec, node)
    image_ids: dict[str, str | None] = {}
    image_ops = _install_image(spec, launches, image_ids)
    put_file(next(f for f in role.files if f.path == READY_SCRIPT), ROLE)
    probe = next((f for f in role.files if f.path == NCCL_ENV_SCRIPT), None)
    if probe is not None:
        # Not a restart trigger: it runs at each start, and a running engine keeps the index
        # it read (deepfleet check's roce.gid_index reports one that differs from the table).
        put_file(probe, ROLE)

    env_ops: dict[str, list[OperationMeta]] = {}
    for launch in launches:
        dep = deployment(spec, launch.deployment)
        if dep.name in env_ops:
            continue
        env_ops[dep.name] = []
        if dep.api_key is not None:
            converge.directory(
                name=f"[{ROLE}] Create /etc/deepfleet", path="/etc/deepfleet", mode="755"
            )
            env_ops[dep.name].append(
                put_secret(
                    role=ROLE,
                    path=env_file_path(dep),
                    ref=dep.api_key,
                    content=lambda value: (
                        "# Managed by deepfleet (role sglang) at deploy time from the spec's "
                        "SecretRef.\n" + env_line(API_KEY_VARIABLE, value)
                    ),
                )
            )

    unit_ops = {
        launch.unit_name: put_file(
            next(f for f in role.files if f.path == f"{UNIT_DIR}/{launch.unit_name}.service"),
            ROLE,
        )
        for launch in launches
    }
    all_units = list(unit_ops.values())
    systemd.daemon_reload(
        name=f"[{ROLE}] Reload systemd units",
        _if=lambda: _did_change(all_units),
    )

    for launch in launches:
        dep = deployment(spec, launch.deployment)
        key = _key(launch.deployment, launch.replica)
        running = _state.engine_container(launch.unit_name)
        if dep.image not in image_ids:
            present = _state.docker_image(dep.image)
            image_ids[dep.image] = present.id if present else None
        expected = expected_container(launch.container_args, dep.image)
        differences = container_differences(running, expected, image_ids[dep.image])
        if differences:
            _FORCED.setdefault(key, []).append(f"{node.name}: {'; '.join(differences)}")
        if running is not None and running.running:
            # A running engine restarts, in turn, when anything it runs from changed.
            _CHANGES.setdefault(key, []).extend(
                [unit_ops[launch.unit_name], *env_ops[launch.deployment], *image_ops]
            )
        # A stopped engine just starts (nothing to drain); rolling waits for it to serve.
        start = converge.service(
            name=f"[{ROLE}] Start and enable {launch.unit_name}",
            service=f"{launch.unit_name}.service",
            running=True,
            enabled=True,
        )
        _STARTED.setdefault(key, []).append(start)


def _step(name: str, commands: list[str], condition: Callable[[], bool] | None) -> None:
    # One call site for every host: pyinfra orders operations by this call stack (and the
    # loop position), which gives every host the same sequence of steps.
    extra: dict[str, Any] = {} if condition is None else {"_if": condition}
    server.shell(name=name, commands=commands, **extra)


def order_anchor(steps: Sequence[RollingStep], present: set[str]) -> str | None:
    """The one host that registers every step of the rolling restart, so that pyinfra orders
    the steps of all hosts the same way.

    pyinfra 3 orders operations by a topological sort of each host's own sequence; hosts that
    share no operation have no order between them. Registering every step on every host gave
    one order at the cost of hosts x steps operations (O(hosts x replicas): most of a 16-node
    no-op run's controller CPU); one host's full sequence, with every other host registering
    only its own steps (the same call site, so the same operation), gives the same order.
    The load balancer (it drains and readmits every replica) is the natural anchor; without
    one in this run (--limit), the first engine host of the plan that is.
    """
    balancers = sorted({n for s in steps if s.action in ("drain", "ready") for n in s.commands})
    engines = sorted({n for s in steps for n in s.commands} - set(balancers))
    return next((n for n in [*balancers, *engines] if n in present), None)


def _rolling_restart(spec: ClusterSpec, node: Node) -> None:
    steps = rolling_restart_plan(spec)
    present = {h.name.rsplit("/", 1)[-1] for h in host.state.inventory}
    is_anchor = order_anchor(steps, present) == node.name
    # One operation on every host, before any step: the anchor's first drain must come after
    # every engine host wrote its units (the drain's condition reads whether they changed).
    _step("[sglang] Roll changed replicas through, one at a time", [], None)
    for step in host.loop(steps):  # type: ignore[no-untyped-call]
        commands = step.commands.get(node.name, [])
        dep, number = step.deployment, step.replica
        in_replica = node.name in replica_nodes(spec, dep, number)
        if not commands and not is_anchor and not (step.action == "wait" and in_replica):
            continue  # not this host's step (see order_anchor)
        forced = _FORCED.get(_key(dep, number), [])
        condition: Callable[[], bool] | None
        if not commands:
            condition = None  # nothing to run here: an empty step that only keeps the order
        elif step.action == "restart" and any(f.startswith(f"{node.name}:") for f in forced):
            condition = None  # this host runs a container that differs: drift, restart for sure
        elif step.action == "wait":
            condition = lambda d=dep, n=number: replica_changed(d, n) or replica_started(d, n)  # noqa: E731
        else:
            condition = lambda d=dep, n=number: replica_changed(d, n)  # noqa: E731
        if step.action == "ready" and condition is not None:
            # Back in rotation when its nodes passed the gate: restarted (drained above) or
            # started (a replica held back by an earlier run comes back once it passes).
            condition = lambda d=dep, n=number: (  # noqa: E731
                (replica_changed(d, n) or replica_started(d, n))
                and _gate.passed(d, n, replica_nodes(spec, d, n))
            )
        name = step.name
        if condition is None and commands and forced:
            name += f" (running container differs from the spec: {'; '.join(forced)})"
        _step(name, commands, condition)
        if step.action == "wait" and (in_replica or is_anchor):
            # Every node of the replica is checked when the replica restarted or started in
            # this run. The anchor registers the gate of every replica (never running it for
            # others) so that "ready" comes after the gate on the load balancer too.
            _gate.gate(
                spec,
                node,
                dep,
                number,
                (lambda d=dep, n=number: replica_changed(d, n) or replica_started(d, n))
                if in_replica
                else (lambda: False),
            )


@operation(is_idempotent=False)
def _drain_servers(targets: Callable[[], list[str]]) -> Generator[str, None, None]:
    if not host.state.is_executing:
        host.noop("drains the replicas whose nodes fail the acceptance gate in this run")
        return
    for target in targets():
        yield f"{HAPROXY_SCRIPT} drain {target}"


def hold_back_failed_replicas(spec: ClusterSpec, node: Node, role: str) -> None:
    """On a load balancer, once its config is written and HAProxy reloaded (called at the end
    of the load_balancer role): drain every replica restarted or started in this run whose
    nodes did not all pass the acceptance gate (one failed, or one's engine never answered so
    its gate never ran). A restarted one is drained already unless a reload put it back; a
    started one never was, and a new replica's server only exists once the load_balancer role
    wrote it: HAProxy's health check alone would route to it."""
    if not _is_lb(spec, node):
        return
    replicas = {
        (dep.name, number): (f"{backend_name(dep)}/{server_name(dep, number)}", replica)
        for dep in spec.deployments
        if haproxy_drains(spec, dep)
        for number, replica in enumerate(dep.replicas, start=1)
    }

    def held_back() -> list[str]:
        return [
            target
            for (dep, number), (target, nodes) in sorted(replicas.items())
            if (replica_changed(dep, number) or replica_started(dep, number))
            and not _gate.passed(dep, number, nodes)
        ]

    _drain_servers(
        name=f"[{role}] Hold back replicas whose nodes did not pass the acceptance gate",
        targets=held_back,
        _if=lambda: bool(held_back()),
    )


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    env_files = {env_file_path(dep) for dep in spec.deployments if dep.api_key is not None}
    launches = node_launches(spec, node)
    return Probes(
        paths=("/etc/deepfleet", IMAGE_CACHE, *sorted(env_files)),
        # The images and containers `_install_image` and `_install_engines` compare.
        images=tuple(sorted({deployment(spec, launch.deployment).image for launch in launches})),
        containers=tuple(launch.unit_name for launch in launches),
    )


@deploy("Serving engines (sglang)")
def apply(spec: ClusterSpec, node: Node) -> None:
    role = plan(spec, node)
    if role is None:
        return
    if HAPROXY_SCRIPT in {f.path for f in role.files}:
        put_file(next(f for f in role.files if f.path == HAPROXY_SCRIPT), ROLE)
    if any(f.path.startswith(UNIT_DIR) for f in role.files):
        _install_engines(spec, node, role)
    _rolling_restart(spec, node)
