"""One lab node: an overlay over the cached rootfs, booted by systemd-nspawn in its namespace."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from infra.lab.paths import LabPaths
from infra.lab.plan import LabNode, LabPlan
from infra.lab.rootfs import SUITE
from infra.lab.system import run

# Measured on this kind of host (docs/lab.md): without --keep-unit nspawn cannot reach a system
# bus (PID 1 is not systemd); without --timezone=off tzdata cannot replace /etc/localtime;
# without CAP_NET_ADMIN nft inside the node fails; the syscalls are the ones Docker and
# systemd's credential handling need.
NSPAWN_ENV: Mapping[str, str] = {
    "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
    "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",
}
CAPABILITIES = ("CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON")
SYSCALLS = ("bpf", "add_key", "keyctl", "request_key")
APT_DIR = Path("/etc/apt")


def nspawn_argv(plan: LabPlan, node: LabNode, paths: LabPaths) -> list[str]:
    return [
        "systemd-nspawn",
        "--boot",
        "--register=no",
        "--keep-unit",
        "--timezone=off",
        "--resolv-conf=off",
        "--link-journal=no",
        "--console=read-only",
        f"--machine={node.name}",
        f"--directory={paths.node_root(node.name)}",
        f"--network-namespace-path=/run/netns/{node.netns}",
        f"--capability={','.join(CAPABILITIES)}",
        f"--system-call-filter={' '.join(SYSCALLS)}",
        # Docker's overlay2 driver cannot stack on the node's overlay root.
        f"--bind={paths.node_docker(node.name)}:/var/lib/docker",
        # The lab's stand-in for the shared NFS model store: same path, read-only.
        f"--bind-ro={plan.models_dir}:{plan.models_mount}",
    ]


def overlay_options(lower: Path, paths: LabPaths, node: str) -> str:
    return f"lowerdir={lower},upperdir={paths.node_upper(node)},workdir={paths.node_work(node)}"


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if line.strip())


def mount_overlay(lower: Path, paths: LabPaths, node: str) -> None:
    root = paths.node_root(node)
    if is_mounted(root):
        return
    for directory in (paths.node_upper(node), paths.node_work(node), root, paths.node_docker(node)):
        directory.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "overlay", "overlay", "-o", overlay_options(lower, paths, node), str(root)])


def apt_proxy_conf(plan: LabPlan) -> str:
    return (
        "// deepfleet lab: nodes have no route out; apt-cacher-ng on the bridge fetches for them.\n"
        f'Acquire::http::Proxy "{plan.apt_proxy}";\n'
        'Acquire::https::Proxy "DIRECT";\n'
        "// Many nodes updating at once through the cache hung with HTTP pipelining on.\n"
        'Acquire::http::Pipeline-Depth "0";\n'
    )


def source_suites(text: str) -> list[str]:
    """The suites an apt sources file names, one-line (.list) or deb822 (.sources) format."""
    suites: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.lower().startswith("suites:"):
            suites += line.split(":", 1)[1].split()
        elif line.startswith(("deb ", "deb-src ")):
            words = line.split()[1:]
            if words and words[0].startswith("["):  # [signed-by=... arch=...]
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = words[1:]
            if len(words) >= 2:
                suites.append(words[1])  # URI, then the suite
    return suites


def host_apt_sources(apt_dir: Path = APT_DIR, suite: str = SUITE) -> dict[str, str]:
    """The host's enabled apt sources that a node can use: plain http, for the nodes' suite.

    https repositories cannot go through the caching proxy and nodes have no other way out; an
    Ubuntu host's (or another release's) sources would break the Debian nodes, which then keep
    the sources mmdebstrap wrote. Returns relative path (under /etc/apt) -> content.
    """
    found: dict[str, str] = {}
    candidates = [apt_dir / "sources.list"]
    listdir = apt_dir / "sources.list.d"
    if listdir.is_dir():
        candidates += sorted(p for p in listdir.iterdir() if p.suffix in (".list", ".sources"))
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text()
        entries = [
            line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
        if not entries or "https://" in text:
            continue
        if not any(s == suite or s.startswith(f"{suite}-") for s in source_suites(text)):
            continue
        found[str(path.relative_to(apt_dir))] = text
    return found


def host_apt_conf(apt_dir: Path = APT_DIR) -> dict[str, str]:
    """Host apt.conf.d snippets (e.g. Check-Valid-Until for a snapshot mirror), minus proxies."""
    found: dict[str, str] = {}
    confdir = apt_dir / "apt.conf.d"
    if confdir.is_dir():
        for path in sorted(confdir.iterdir()):
            if path.is_file() and "proxy" not in path.read_text().lower():
                found[f"apt.conf.d/{path.name}"] = path.read_text()
    return found


def prepare_root(plan: LabPlan, node: LabNode, paths: LabPaths, public_key: str) -> None:
    """Per-node files, written into the overlay's upper layer before the first boot."""
    root = paths.node_root(node.name)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key.strip() + "\n")
    keys.chmod(0o600)
    etc = root / "etc"
    (etc / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{node.name}\n::1\tlocalhost ip6-localhost\n"
    )
    sources = host_apt_sources()
    if sources:
        # The host's sources replace mmdebstrap's, so nodes see the same mirror as the host.
        (etc / "apt/sources.list").unlink(missing_ok=True)
    for relative, text in {**host_apt_conf(), **sources}.items():
        target = etc / "apt" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_text(text)
    (etc / "apt/apt.conf.d/01deepfleet-lab-proxy").write_text(apt_proxy_conf(plan))
    Path(plan.models_dir).mkdir(parents=True, exist_ok=True)


def write_placeholder_model(directory: Path) -> None:
    """A model directory without weights, with a valid checksum manifest (SHA256SUMS)."""
    directory.mkdir(parents=True, exist_ok=True)
    placeholder = directory / "LAB-PLACEHOLDER.txt"
    content = b"deepfleet lab: no weights here; the stand-in engine needs none.\n"
    placeholder.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    (directory / "SHA256SUMS").write_text(f"{digest}  {placeholder.name}\n")


def spawn(plan: LabPlan, node: LabNode, paths: LabPaths) -> int:
    """Boot the node in the background; returns the systemd-nspawn PID.

    The host has no systemd to hold a transient unit, so nspawn runs in its own session
    (immune to the caller's terminal and signals) with its console logged to a file.
    """
    paths.logs.mkdir(parents=True, exist_ok=True)
    with open(paths.node_log(node.name), "ab") as log:
        process = subprocess.Popen(
            nspawn_argv(plan, node, paths),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, **NSPAWN_ENV},
        )
    return process.pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pid: int) -> None:
    """Collect our own exited children so they do not linger as zombies."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_processes(pids: list[int], timeout: float = 15.0) -> None:
    """Ask nspawn to power the nodes off (SIGTERM -> clean shutdown), then SIGKILL stragglers."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in pids:
            reap(pid)
        if not any(pid_alive(pid) for pid in pids):
            return
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        reap(pid)


def kill_netns_processes(netns: str, timeout: float = 5.0) -> None:
    """SIGKILL what still runs in a node's namespace after its nspawn died.

    Killing systemd-nspawn with SIGKILL leaves the container's systemd running; booting a
    second one on the same root would corrupt it, so the orphan goes first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = run(["ip", "netns", "pids", netns], check=False).stdout.split()
        pids = [int(p) for p in listed if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_node_dir(paths: LabPaths, node: str) -> None:
    """Throw the node's writable layer away (it is a throwaway host); keep the shared rootfs."""
    root = paths.node_root(node)
    if is_mounted(root):
        run(["umount", str(root)], check=False)
        if is_mounted(root):
            run(["umount", "-l", str(root)], check=False)
    if not is_mounted(root):
        shutil.rmtree(paths.node_dir(node), ignore_errors=True)
