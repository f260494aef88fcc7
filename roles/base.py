"""base: what every node needs before anything else.

Hostname and the cluster's /etc/hosts, apt mirror and proxy, a small set of tools, kernel
settings (sysctl) and login limits for inference, cloud-init kept off the network, the site's
time zone, and unattended upgrades kept away from the GPU stack and the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyinfra import logger
from pyinfra.api.deploy import deploy
from pyinfra.context import host
from pyinfra.facts.server import OsRelease
from pyinfra.operations import python
from pyinfra.operations.util import any_changed

from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Node
from roles import _converge as converge
from roles._apt import (
    LAB_UPDATE_TIMEOUT_S,
    UPDATE_TIMEOUT_S,
    install_packages,
    refresh_lists,
)
from roles._state import Probes

ROLE = "base"

# Tools every node gets; each is used by a role, a check or an operator runbook.
BASE_PACKAGES: tuple[str, ...] = (
    "ca-certificates",  # https repositories (NVIDIA, Docker)
    "curl",  # health checks against the inference API
    "gnupg",  # repository signing keys
    "ethtool",  # NIC link state and speed (field problem: bad optics, unseated NICs)
    "pciutils",  # lspci: are the GPUs and NICs on the bus at all
    "numactl",  # GPU/NIC/CPU NUMA affinity checks
    "rsync",  # model copies to a local cache
    "jq",  # reading JSON from the API and from nvidia-smi -q -x converters
)

# The Ubuntu release a site mirror is written for. The spec has no release field yet, so this is
# the one documented place: 24.04 LTS, the release the NVIDIA 570 server driver packages target.
# `apply` refuses to point a host of another release at the mirror.
UBUNTU_RELEASE = "noble"

# Package-name patterns unattended-upgrades must leave alone (the nvidia_driver role holds them).
UPGRADE_BLACKLIST: tuple[str, ...] = ("nvidia-", "libnvidia-", "cuda-", "linux-")

NOFILE_LIMIT = 1048576

HOSTS_PATH = "/etc/hosts"
SYSCTL_PATH = "/etc/sysctl.d/90-deepfleet.conf"
LIMITS_PATH = "/etc/security/limits.d/90-deepfleet.conf"
APT_PROXY_PATH = "/etc/apt/apt.conf.d/90deepfleet-proxy"
APT_SOURCES_PATH = "/etc/apt/sources.list.d/ubuntu.sources"
UNATTENDED_PATH = "/etc/apt/apt.conf.d/51deepfleet-unattended-upgrades"
CLOUD_INIT_PATH = "/etc/cloud/cloud.cfg.d/99-disable-network-config.cfg"


@dataclass(frozen=True)
class Sysctl:
    key: str
    value: str
    reason: str
    # Settable from inside a container that has its own network namespace (the lab's nodes):
    # measured on the lab's kernel with `unshare -n sysctl -w`. Everything else is a host-wide
    # setting that the container sees read-only, or not at all.
    per_netns: bool = False


SYSCTLS: tuple[Sysctl, ...] = (
    Sysctl("net.core.rmem_max", "268435456", "Large socket buffers: NCCL/Gloo over TCP, NFS."),
    Sysctl("net.core.wmem_max", "268435456", "Large socket buffers: NCCL/Gloo over TCP, NFS."),
    Sysctl(
        "net.ipv4.tcp_rmem",
        "4096 87380 268435456",
        "TCP autotuning may grow a receive buffer up to 256 MiB (100-400 Gb/s links).",
        per_netns=True,
    ),
    Sysctl(
        "net.ipv4.tcp_wmem",
        "4096 65536 268435456",
        "TCP autotuning may grow a send buffer up to 256 MiB.",
        per_netns=True,
    ),
    Sysctl("net.core.netdev_max_backlog", "250000", "Do not drop bursts on fast NICs."),
    Sysctl(
        "net.core.somaxconn", "4096", "Accept backlog of the API and the router.", per_netns=True
    ),
    Sysctl(
        "net.ipv4.tcp_mtu_probing",
        "1",
        "Find the path MTU when jumbo frames meet a 1500-byte hop.",
        per_netns=True,
    ),
    Sysctl(
        "net.ipv4.tcp_slow_start_after_idle",
        "0",
        "Long-lived connections (streaming tokens, NCCL) keep their window when idle.",
        per_netns=True,
    ),
    Sysctl("fs.file-max", "2097152", "Many open sockets and weight files."),
    Sysctl("fs.inotify.max_user_instances", "8192", "Containers and their log watchers."),
    Sysctl("fs.inotify.max_user_watches", "1048576", "Containers and their log watchers."),
    Sysctl("vm.max_map_count", "1048576", "safetensors mmap every shard of a 700 GB model."),
    Sysctl("vm.swappiness", "1", "Keep the inference server's host memory out of swap."),
    Sysctl("vm.zone_reclaim_mode", "0", "No NUMA-local reclaim stalls on multi-socket hosts."),
    Sysctl(
        "kernel.numa_balancing",
        "0",
        "NVIDIA's advice for GPU servers: no automatic NUMA page migration under pinned memory.",
    ),
)


@dataclass(frozen=True)
class HostsEntry:
    address: str
    names: tuple[str, ...]


def management_address(spec: ClusterSpec, node: Node) -> str | None:
    """The node's address on a management network, else the address pyinfra reaches it at."""
    for address in node.addresses:
        if spec.network(address.network).purpose == "management":
            return str(address.address)
    return str(node.address) if node.address is not None else None


def hosts_entries(spec: ClusterSpec) -> list[HostsEntry]:
    domain = spec.site.dns.search[0] if spec.site.dns.search else None
    entries = []
    for node in spec.nodes:
        address = management_address(spec, node)
        if address is None:
            continue  # cloud nodes: their addresses are Pulumi outputs; DNS names them there
        names = (f"{node.name}.{domain}", node.name) if domain else (node.name,)
        entries.append(HostsEntry(address, names))
    return entries


def applied_sysctls(spec: ClusterSpec) -> list[Sysctl]:
    """All settings on real hosts; in the lab only those a container can set (per_netns)."""
    return [s for s in SYSCTLS if s.per_netns or not spec.is_lab]


def plan(spec: ClusterSpec, node: Node) -> RolePlan:
    result = RolePlan(role=ROLE, packages=list(BASE_PACKAGES))
    entries = hosts_entries(spec)
    listed = any(node.name in entry.names for entry in entries)
    # A node listed with its real address must not also resolve to 127.0.1.1: Gloo and NCCL
    # bind to what the hostname resolves to, and loopback would break multi-node serving.
    domain = spec.site.dns.search[0] if spec.site.dns.search else None
    self_line = None if listed else (f"{node.name}.{domain} {node.name}" if domain else node.name)
    result.files.append(
        HostFile(HOSTS_PATH, render("base/hosts.j2", entries=entries, self_line=self_line))
    )
    result.summary.append(f"hostname {node.name}; /etc/hosts lists {len(entries)} nodes")

    if spec.site.apt.mirror:
        result.files.append(
            HostFile(
                APT_SOURCES_PATH,
                render(
                    "base/ubuntu.sources.j2", mirror=spec.site.apt.mirror, release=UBUNTU_RELEASE
                ),
            )
        )
        result.summary.append(f"apt mirror {spec.site.apt.mirror} (Ubuntu {UBUNTU_RELEASE})")
    if spec.site.apt.proxy:
        result.files.append(
            HostFile(APT_PROXY_PATH, render("base/apt-proxy.conf.j2", proxy=spec.site.apt.proxy))
        )
        result.summary.append(f"apt proxy {spec.site.apt.proxy}")
    result.files.append(
        HostFile(
            UNATTENDED_PATH,
            render("base/unattended-upgrades.conf.j2", patterns=UPGRADE_BLACKLIST),
        )
    )
    result.summary.append(
        "unattended upgrades skip " + ", ".join(f"{p}*" for p in UPGRADE_BLACKLIST)
    )

    result.files.append(HostFile(SYSCTL_PATH, render("base/sysctl.conf.j2", settings=SYSCTLS)))
    applied = applied_sysctls(spec)
    if len(applied) == len(SYSCTLS):
        result.summary.append(f"sysctl: {len(SYSCTLS)} settings in {SYSCTL_PATH}, applied now")
    else:
        result.summary.append(
            f"sysctl: {len(SYSCTLS)} settings in {SYSCTL_PATH}; lab: only the {len(applied)} "
            "per-network-namespace ones applied (the container sees the others read-only)"
        )
    result.files.append(HostFile(LIMITS_PATH, render("base/limits.conf.j2", nofile=NOFILE_LIMIT)))
    result.summary.append(f"limits: memlock unlimited, nofile {NOFILE_LIMIT}")

    if spec.site.disable_cloud_init_network:
        result.files.append(HostFile(CLOUD_INIT_PATH, render("base/cloud-init-network.cfg.j2")))
        result.summary.append("cloud-init network config disabled")
    result.summary.append(f"time zone {spec.site.timezone}")
    return result


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(sysctls=tuple(setting.key for setting in applied_sysctls(spec)))


def _refuse(state: Any, host: Any, message: str) -> bool:
    # FunctionCommand passes state and host to a callback that names both arguments; False
    # fails the operation on this host only, with the message in the deploy output.
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


@deploy("base")
def apply(spec: ClusterSpec, node: Node) -> None:
    from roles._files import put_file

    desired = plan(spec, node)
    files = {f.path: f for f in desired.files}

    converge.hostname(name=f"[{ROLE}] Set hostname {node.name}", hostname=node.name)
    converge.timezone(
        name=f"[{ROLE}] Set time zone {spec.site.timezone}", timezone=spec.site.timezone
    )
    put_file(files[HOSTS_PATH], ROLE)

    apt_ops = []
    if APT_SOURCES_PATH in files:
        codename = (host.get_fact(OsRelease) or {}).get("version_codename")
        if codename and codename != UBUNTU_RELEASE:
            python.call(
                name=f"[{ROLE}] Refuse to point {node.name} at a mirror for another release",
                function=_refuse,
                message=(
                    f"{node.name} runs {codename!r} but the site mirror is written for "
                    f"{UBUNTU_RELEASE!r}: set roles/base.py UBUNTU_RELEASE or reinstall the node"
                ),
            )
        else:
            apt_ops.append(put_file(files[APT_SOURCES_PATH], ROLE))
    if APT_PROXY_PATH in files:
        apt_ops.append(put_file(files[APT_PROXY_PATH], ROLE))
    put_file(files[UNATTENDED_PATH], ROLE)
    update_timeout_s = LAB_UPDATE_TIMEOUT_S if spec.is_lab else UPDATE_TIMEOUT_S
    sources_changed = any_changed(*apt_ops)
    if apt_ops:
        refresh_lists(
            f"[{ROLE}] Refresh apt lists from the new sources",
            update_timeout_s,
            sources_changed,
            one_host_at_a_time=spec.is_lab,
        )
    install_packages(
        f"[{ROLE}] Install base packages",
        list(desired.packages),
        ROLE,
        update_timeout_s,
        refreshed=sources_changed if apt_ops else None,
        one_host_at_a_time=spec.is_lab,
    )

    put_file(files[SYSCTL_PATH], ROLE)
    for setting in applied_sysctls(spec):
        # server.sysctl compares the running value, so hand changes show up as drift too.
        converge.sysctl(
            name=f"[{ROLE}] Set {setting.key} to {setting.value}",
            key=setting.key,
            value=setting.value,
        )
    put_file(files[LIMITS_PATH], ROLE)
    if CLOUD_INIT_PATH in files:
        put_file(files[CLOUD_INIT_PATH], ROLE)
