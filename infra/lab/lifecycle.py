"""`lab up`, `lab down` and `lab status`: the lab's state changes, in the order they must run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from infra.errors import Problem, UserError
from infra.lab import aptcache, network, node
from infra.lab.leftovers import Leftovers, classify_cmdline, find_leftovers, running_nspawns
from infra.lab.paths import LabPaths
from infra.lab.plan import NFT_TABLE, LabNode, LabPlan
from infra.lab.rootfs import RootfsResult, ensure_rootfs
from infra.lab.state import LabState, load_state, save_state
from infra.lab.system import preflight, run
from infra.standin.image import ImageBuildError, build_standin_image

SSH_PORT = 22
APT_WARM_TIMEOUT = 180
SSH_TIMEOUT = 90.0

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass
class UpReport:
    rootfs: RootfsResult
    started: list[str] = field(default_factory=list)
    already_running: list[str] = field(default_factory=list)
    start_seconds: float = 0.0  # namespaces, overlays and nspawn processes created
    ssh_seconds: float = 0.0  # from the first spawn until the last sshd answered
    ssh_ready: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    groups: tuple[str, ...]
    state: str  # running (sshd answers) | booting | stopped | absent


@contextlib.contextmanager
def _exclusive(paths: LabPaths) -> Iterator[None]:
    """One `up` or `down` at a time per checkout (a developer and a test run may race)."""
    paths.state.mkdir(parents=True, exist_ok=True)
    with open(paths.state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_ssh_key(paths: LabPaths) -> str:
    key = paths.ssh_key
    if not key.exists():
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deepfleet-lab", "-f", str(key)])
    return key.with_suffix(".pub").read_text()


def ensure_api_key(paths: LabPaths) -> str:
    path = paths.api_key
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 from the start: the key is never readable by others, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("dflab-" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def nspawn_running(pid: int | None, lab_node: LabNode) -> bool:
    """True when `pid` is still the nspawn of this node (not a reused PID)."""
    if pid is None or not node.pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    except OSError:
        return False
    return (
        classify_cmdline(argv, "") == "nspawn"
        and f"--network-namespace-path=/run/netns/{lab_node.netns}" in argv
    )


def sshd_answers(address: str, timeout: float = 0.5) -> bool:
    """sshd is up when it sends its banner, not merely when the port accepts."""
    try:
        with socket.create_connection((address, SSH_PORT), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_ssh(
    nodes: Iterable[LabNode],
    timeout: float = SSH_TIMEOUT,
    since: float | None = None,
    pids: Mapping[str, int] | None = None,
    logs: Callable[[str], Path] | None = None,
) -> dict[str, float]:
    """Poll each node's sshd; seconds (from `since`) until each answered.

    With `pids`, a node whose systemd-nspawn exited fails at once instead of at the timeout.
    """
    start = time.monotonic() if since is None else since
    pending = {n.name: n for n in nodes}
    ready: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, lab_node in list(pending.items()):
            if sshd_answers(str(lab_node.address)):
                ready[name] = time.monotonic() - start
                del pending[name]
            elif pids is not None and not nspawn_running(pids.get(name), lab_node):
                tail = _log_tail(logs(name)) if logs else ""
                raise UserError(
                    f"node {name} stopped while booting",
                    [Problem(tail or "systemd-nspawn exited", hint=f"see .lab/logs/{name}.log")],
                )
        if pending:
            time.sleep(0.2)
    if pending:
        raise UserError(
            f"sshd did not answer within {timeout:.0f} s",
            [
                Problem(f"node {name} ({n.address})", hint=f"see .lab/logs/{name}.log")
                for name, n in pending.items()
            ],
        )
    return ready


def _up(
    plan: LabPlan,
    paths: LabPaths,
    spec_path: str = "",
    say: Say = _quiet,
    ssh_timeout: float = SSH_TIMEOUT,
) -> UpReport:
    public_key = ensure_ssh_key(paths)
    ensure_api_key(paths)
    for model_path in plan.model_paths:
        node.write_placeholder_model(Path(plan.models_dir) / model_path)
    say("rootfs: checking the cache")
    report = UpReport(rootfs=ensure_rootfs(paths.cache_root))
    say(
        f"rootfs: {'built' if report.rootfs.built else 'cached'} {report.rootfs.path}"
        + (f" in {report.rootfs.seconds:.1f} s" if report.rootfs.built else "")
    )
    # The engine stand-in image is built here, once, rather than by the first deploy: the
    # build takes a minute on a cold cache and needs root on this machine, like the rootfs.
    say("engine image: checking the stand-in image cache")
    try:
        image = build_standin_image()
    except ImageBuildError as error:
        raise UserError(
            "the lab's engine stand-in image could not be built",
            [Problem(str(error), hint="rerun `deepfleet lab up`; details above")],
        ) from error
    say(f"engine image: {'cached' if image.cached else 'built'} {image.path}")
    previous = load_state(paths.state_file)
    network.ensure_bridge(plan)
    acng_pid = aptcache.start(plan, paths)
    if acng_pid is None:
        ours = find_leftovers(paths, [plan.bridge]).acng_pids
        acng_pid = ours[0] if ours else None
        if not ours:
            say(
                f"apt: reusing the apt-cacher-ng that already answers on {plan.apt_proxy}"
                " (not started by the lab; `lab down` leaves it alone)"
            )
    # The processes, not the state file, say what runs: a lost or stale state file must not
    # lead to a second nspawn on a node's root.
    by_netns = running_nspawns()
    known = list(plan.nodes) + list(previous.plan.nodes if previous else ())
    pids = {n.name: by_netns[n.netns] for n in known if n.netns in by_netns}
    # Nodes of an earlier, larger `up` that still run stay recorded, so `status` shows them.
    extra = tuple(
        n
        for n in (previous.plan.nodes if previous else ())
        if n.name not in {m.name for m in plan.nodes} and nspawn_running(pids.get(n.name), n)
    )
    state = LabState(
        plan=replace(plan, nodes=plan.nodes + extra),
        spec=spec_path,
        rootfs=str(report.rootfs.path),
        pids=pids,
        apt_cache_pid=acng_pid,
    )
    to_start = []
    for lab_node in plan.nodes:
        if nspawn_running(pids.get(lab_node.name), lab_node):
            report.already_running.append(lab_node.name)
        else:
            to_start.append(lab_node)
    began = time.monotonic()
    for lab_node in to_start:
        if network.netns_exists(lab_node.netns):
            node.kill_netns_processes(lab_node.netns)
        network.ensure_node_network(plan, lab_node)
        node.mount_overlay(report.rootfs.path, paths, lab_node.name)
        node.prepare_root(plan, lab_node, paths, public_key)
        state.pids[lab_node.name] = node.spawn(plan, lab_node, paths)
        report.started.append(lab_node.name)
        # Recorded after every node, so that `down` after a crash here knows the PIDs.
        save_state(paths.state_file, state)
    save_state(paths.state_file, state)
    report.start_seconds = time.monotonic() - began
    if to_start:
        say(
            f"nodes: started {', '.join(report.started)} in {report.start_seconds:.1f} s;"
            " waiting for sshd"
        )
    report.ssh_ready = wait_for_ssh(
        to_start, timeout=ssh_timeout, since=began, pids=state.pids, logs=paths.node_log
    )
    report.ssh_seconds = max(report.ssh_ready.values(), default=0.0)
    if to_start:
        warm_apt_cache(plan, paths, to_start[0].name, say)
    return report


def warm_apt_cache(plan: LabPlan, paths: LabPaths, name: str, say: Say) -> None:
    """Fetch the apt indexes through the cache from one node, so that its first download
    from the mirror is not made by many nodes at once (docs/lab.md)."""
    started = time.monotonic()
    try:
        result = subprocess.run(
            ssh_argv(plan, paths, name, ["apt-get", "update", "-qq"]),
            capture_output=True,
            text=True,
            timeout=APT_WARM_TIMEOUT,
            check=False,
        )
        ok = result.returncode == 0
        detail = result.stderr.strip().splitlines()[-1:] if not ok else []
    except subprocess.TimeoutExpired:
        ok, detail = False, [f"no answer in {APT_WARM_TIMEOUT} s"]
    if ok:
        say(
            f"apt: indexes fetched through the cache from {name} in "
            f"{time.monotonic() - started:.1f} s"
        )
    else:
        # Not fatal: the deploy refreshes the lists itself.
        say(f"apt: warming the cache from {name} failed ({'; '.join(detail)})")


def _down(paths: LabPaths, bridges: Iterable[str], say: Say) -> Leftovers:
    state = load_state(paths.state_file)
    wanted_bridges = set(bridges) | ({state.plan.bridge} if state else set())
    found = find_leftovers(paths, wanted_bridges)
    recorded = [pid for pid in (state.pids.values() if state else ()) if pid in found.nspawn_pids]
    nspawns = sorted(set(found.nspawn_pids) | set(recorded))
    if nspawns:
        say(f"stopping {len(nspawns)} node(s)")
        node.stop_processes(nspawns)
    # Anything still inside a lab namespace (a node whose nspawn died) goes too.
    strays = find_leftovers(paths, wanted_bridges).netns_pids
    if strays:
        node.stop_processes(strays, timeout=3.0)
    if found.acng_pids:
        node.stop_processes(found.acng_pids, timeout=5.0)
    for point in find_leftovers(paths, wanted_bridges).mounts:
        if point.startswith("/run/netns/"):
            continue  # `ip netns del` below removes those handles
        run(["umount", point], check=False)
    leftover = find_leftovers(paths, wanted_bridges)
    for mount in leftover.mounts:
        if not mount.startswith("/run/netns/"):
            run(["umount", "-l", mount], check=False)
    for node_dir in leftover.node_dirs:
        node.remove_node_dir(paths, Path(node_dir).name)
    for link in leftover.links:
        run(["ip", "link", "del", link], check=False)
    for netns in leftover.netns:
        run(["ip", "netns", "del", netns], check=False)
    if leftover.nft_table:
        run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)
    _release_netns_dir()
    paths.state_file.unlink(missing_ok=True)
    remaining = find_leftovers(paths, wanted_bridges)
    if not remaining.clean:
        raise UserError(
            "the lab could not be removed completely",
            [Problem(line) for line in remaining.describe()],
        )
    return remaining


def up(
    plan: LabPlan,
    paths: LabPaths,
    spec_path: str = "",
    say: Say = _quiet,
    ssh_timeout: float = SSH_TIMEOUT,
) -> UpReport:
    """Start every node of the plan that is not running; running ones are left alone."""
    preflight()
    with _exclusive(paths):
        return _up(plan, paths, spec_path, say, ssh_timeout)


def down(paths: LabPaths, bridges: Iterable[str] = (), say: Say = _quiet) -> Leftovers:
    """Remove everything the lab made on the host; raises if something could not be removed.

    Works from the state file when there is one and from name prefixes always, so it also
    cleans up after an `up` that died half-way or a deleted `.lab/`.
    """
    preflight()
    with _exclusive(paths):
        return _down(paths, bridges, say)


def _release_netns_dir() -> None:
    """`ip netns add` turns /run/netns into a bind mount of itself; undo that once it is empty."""
    netns_dir = network.NETNS_DIR
    if netns_dir.is_dir() and not any(netns_dir.iterdir()) and node.is_mounted(netns_dir):
        run(["umount", str(netns_dir)], check=False)


def status(plan: LabPlan, state: LabState | None) -> list[NodeStatus]:
    nodes = list(plan.nodes)
    if state is not None:
        known = {n.name for n in nodes}
        nodes += [n for n in state.plan.nodes if n.name not in known]
    result = []
    for lab_node in nodes:
        pid = state.pids.get(lab_node.name) if state else None
        if state is None or lab_node.name not in state.pids:
            condition = "absent"
        elif not nspawn_running(pid, lab_node):
            condition = "stopped"
        elif sshd_answers(str(lab_node.address)):
            condition = "running"
        else:
            condition = "booting"
        result.append(NodeStatus(lab_node.name, str(lab_node.address), lab_node.groups, condition))
    return result


def ssh_argv(plan: LabPlan, paths: LabPaths, name: str, command: list[str]) -> list[str]:
    target = plan.node(name)
    # Lab nodes are recreated with new host keys at will: never record or check them.
    return [
        "ssh",
        "-i",
        str(paths.ssh_key),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "IdentitiesOnly=yes",
        f"root@{target.address}",
        *command,
    ]
