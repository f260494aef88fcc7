"""Finding what a lab left on the host, by name, without trusting the state file.

`lab down` must also clean up after an `up` that died half-way or a deleted `.lab/`, so it looks
for the lab's prefixes in `ip netns`, `ip link`, /proc/mounts and /proc/*/cmdline.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.lab.aptcache import PROGRAM as ACNG_PROGRAM
from infra.lab.paths import LabPaths
from infra.lab.plan import NETNS_PREFIX, NFT_TABLE, VETH_PREFIX
from infra.lab.system import run

NSPAWN_NETNS_FLAG = "--network-namespace-path=/run/netns/"


@dataclass
class Leftovers:
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    nspawn_pids: list[int] = field(default_factory=list)
    netns_pids: list[int] = field(default_factory=list)
    acng_pids: list[int] = field(default_factory=list)
    nft_table: bool = False
    node_dirs: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.netns
            or self.links
            or self.mounts
            or self.nspawn_pids
            or self.netns_pids
            or self.acng_pids
            or self.nft_table
            or self.node_dirs
        )

    def describe(self) -> list[str]:
        lines = [f"network namespace {n}" for n in self.netns]
        lines += [f"link {n}" for n in self.links]
        lines += [f"mount {m}" for m in self.mounts]
        lines += [f"systemd-nspawn pid {p}" for p in self.nspawn_pids]
        lines += [f"process {p} in a lab namespace" for p in self.netns_pids]
        lines += [f"apt-cacher-ng pid {p}" for p in self.acng_pids]
        lines += [f"nft table inet {NFT_TABLE}"] if self.nft_table else []
        lines += [f"node directory {d}" for d in self.node_dirs]
        return lines


def parse_netns(output: str) -> list[str]:
    """Names from `ip netns list` ("NAME" or "NAME (id: N)") that belong to the lab."""
    names = (line.split()[0] for line in output.splitlines() if line.strip())
    return [name for name in names if name.startswith(NETNS_PREFIX)]


def parse_links(output: str, bridges: Iterable[str] = ()) -> list[str]:
    """Lab interfaces from `ip -o link show` ("3: NAME@if2: <...> ..."): veths and bridges."""
    wanted = set(bridges)
    found = []
    for line in output.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if name.startswith(VETH_PREFIX) or name in wanted:
            found.append(name)
    return found


def _unescape_mount(path: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def parse_mounts(text: str, under: Path, netns_dir: str = "/run/netns/") -> list[str]:
    """Mount points under `under` or lab netns handles, deepest first (the unmount order)."""
    prefix = str(under).rstrip("/") + "/"
    points = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        point = _unescape_mount(fields[1])
        if point.startswith(prefix) or point.startswith(netns_dir + NETNS_PREFIX):
            points.append(point)
    return sorted(set(points), key=lambda p: (-p.count("/"), p))


def classify_cmdline(argv: Sequence[str], acng_conf_dir: str) -> str | None:
    """'nspawn' or 'acng' when a process command line is one the lab started, else None."""
    if not argv:
        return None
    program = os.path.basename(argv[0])
    if program == "systemd-nspawn" and any(
        arg.startswith(NSPAWN_NETNS_FLAG + NETNS_PREFIX) for arg in argv
    ):
        return "nspawn"
    if program == ACNG_PROGRAM and acng_conf_dir in argv:
        return "acng"
    return None


def _process_cmdlines() -> Iterable[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield int(entry.name), raw.decode(errors="replace").rstrip("\0").split("\0")


def running_nspawns() -> dict[str, int]:
    """Lab network namespace name -> PID of the systemd-nspawn booted in it."""
    found: dict[str, int] = {}
    for pid, argv in _process_cmdlines():
        if classify_cmdline(argv, "") != "nspawn":
            continue
        for arg in argv:
            if arg.startswith(NSPAWN_NETNS_FLAG):
                found[arg[len(NSPAWN_NETNS_FLAG) :]] = pid
    return found


def find_leftovers(paths: LabPaths, bridges: Iterable[str] = ()) -> Leftovers:
    found = Leftovers()
    found.netns = parse_netns(run(["ip", "netns", "list"], check=False).stdout)
    found.links = parse_links(run(["ip", "-o", "link", "show"], check=False).stdout, bridges)
    found.mounts = parse_mounts(Path("/proc/self/mounts").read_text(), paths.nodes_root)
    acng_conf_dir = str((paths.acng_dir / "conf").resolve())
    for pid, argv in _process_cmdlines():
        kind = classify_cmdline(argv, acng_conf_dir)
        if kind == "nspawn":
            found.nspawn_pids.append(pid)
        elif kind == "acng":
            found.acng_pids.append(pid)
    for netns in found.netns:
        pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
        found.netns_pids += [int(p) for p in pids if p.isdigit()]
    found.nft_table = run(["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0
    if paths.nodes_root.is_dir():
        found.node_dirs = sorted(str(p) for p in paths.nodes_root.iterdir())
    return found
