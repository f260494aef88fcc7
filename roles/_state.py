"""Ask a node once for what a converged node already has, so that a no-op run sends little.

pyinfra 3 runs each operation on every host before the next one starts, and `files.put`,
`server.sysctl`, `systemd.service` or `apt.packages` each ask the node two or three facts when
they run: at 16 lab nodes a no-op deploy spent most of its time in those round trips and
barriers (docs/performance.md). Instead, `deploy.py` asks every host once, while pyinfra
prepares the deploy (all hosts in parallel, before any operation runs):

- type, mode, owner, group and SHA-1 of every file the roles plan;
- the entries of directories a role keeps free of files it does not own (netplan);
- the running value of the sysctls the roles set;
- whether each systemd unit is active and enabled;
- the host name, the time zone and the installed packages;
- what Docker reports of the engine's images and containers and of itself (`docker image
  inspect`, `docker inspect`, `docker info`) on nodes whose roles ask for them.

The roles then emit an operation only where the node differs. A differing file still gets its
own "[role] Write /path" operation (pyinfra's `files.put`, with its own facts), so the drift
report and the deploy output name exactly what changed.

Like pyinfra's own prepare-time facts, the snapshot is the node before this run: a file that an
earlier operation of the same run rewrites (a package installing its default config) is put
right by the next run. Without a snapshot (a role applied on its own, as in unit tests) every
helper falls back to the plain pyinfra operation.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pyinfra.api.facts import FactBase
from pyinfra.context import host
from pyinfra.facts.deb import DebPackages

from facts.docker import DockerInfo, parse_docker_info
from facts.engine import (
    ContainerState,
    DockerImage,
    EngineContainer,
    ImageState,
    parse_container,
    parse_image,
)

SECTIONS = ("stat", "sha1", "list", "sysctl", "units", "host", "packages")
# Sections with an argument ("##image REF"): one per image, container, or the daemon.
DOCKER_SECTIONS = ("image", "container", "dockerinfo")


@dataclass(frozen=True)
class PathState:
    kind: str  # stat's %F: "regular file", "directory", "symbolic link", ...
    mode: int
    user: str
    group: str
    sha1: str | None = None


@dataclass
class NodeSnapshot:
    paths: dict[str, PathState] = field(default_factory=dict)
    listed: dict[str, list[str]] = field(default_factory=dict)  # directory -> its entries
    sysctls: dict[str, str] = field(default_factory=dict)
    active: dict[str, bool] = field(default_factory=dict)
    enabled: dict[str, bool] = field(default_factory=dict)
    hostname: str | None = None
    timezone: str | None = None
    packages: dict[str, Any] = field(default_factory=dict)  # as pyinfra's DebPackages
    # Asked for and found (an object) or asked for and absent (None); not asked: no key.
    images: dict[str, ImageState | None] = field(default_factory=dict)
    containers: dict[str, ContainerState | None] = field(default_factory=dict)
    docker_info: dict[str, Any] | None = None
    docker_info_asked: bool = False


class NodeSnapshotFact(FactBase[NodeSnapshot]):
    """One command that answers everything `NodeSnapshot` holds (see the module docstring)."""

    def command(
        self,
        paths: tuple[str, ...],
        directories: tuple[str, ...],
        sysctls: tuple[str, ...],
        units: tuple[str, ...] = (),
        images: tuple[str, ...] = (),
        containers: tuple[str, ...] = (),
        docker_info: bool = False,
    ) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths) or "/nonexistent"
        listed = " ".join(shlex.quote(d) for d in directories)
        parts = [
            "echo '##stat'",
            f"stat -c '%F|%a|%U|%G|%n' -- {quoted} 2>/dev/null",
            "echo '##sha1'",
            f"sha1sum -- {quoted} 2>/dev/null",
            "echo '##list'",
            f"find {listed} -mindepth 1 -maxdepth 1 2>/dev/null" if listed else "true",
            "echo '##sysctl'",
            f"sysctl {' '.join(shlex.quote(k) for k in sysctls)} 2>/dev/null"
            if sysctls
            else "true",
            "echo '##units'",
            # Named units only: `systemctl show '*'` costs 0.2 s of CPU per node (every unit's
            # enablement), a list of ten names 10 ms.
            "systemctl show --property Id --property SubState --property UnitFileState "
            f"{' '.join(shlex.quote(u) for u in units)} 2>/dev/null"
            if units
            else "true",
            "echo '##host'",
            "uname -n",
            "readlink -f /etc/localtime | sed 's|.*/zoneinfo/||'",
            "echo '##packages'",
            f"{DebPackages().command()} 2>/dev/null",
        ]
        # The same commands as the DockerImage, EngineContainer and DockerInfo facts, each
        # answer after a marker naming what it answers; no docker (a fresh node) answers
        # nothing. The docker CLI takes a good fraction of a second per call on a busy node,
        # so the calls run in the background, side by side with the reads above.
        has_docker = "command -v docker >/dev/null 2>&1 &&"
        docker = [(f"##image {ref}", DockerImage().command(ref)) for ref in images]
        docker += [(f"##container {name}", EngineContainer().command(name)) for name in containers]
        if docker_info:
            docker.append(("##dockerinfo ", DockerInfo().command()))
        if docker:
            started = [
                f'{{ {has_docker} {command}; }} >"$d/{i}" 2>/dev/null &'
                for i, (_, command) in enumerate(docker)
            ]
            collected = [
                f'echo {shlex.quote(marker)}; cat "$d/{i}"' for i, (marker, _) in enumerate(docker)
            ]
            temporary = (
                'd=$(mktemp -d 2>/dev/null) || { d=/tmp/deepfleet-snapshot.$$; mkdir -p "$d"; }'
            )
            parts = [temporary, *started, *parts, "wait", *collected, 'rm -rf "$d"']
        # Every part may fail on a fresh node (no such file, no systemd yet): the answer is
        # what could be read, never an error.
        return _sequence([*parts, "true"])

    def process(self, output: Iterable[str]) -> NodeSnapshot:
        return parse_snapshot(output)


def _sequence(commands: list[str]) -> str:
    """One shell line: `a; b & c; d` (a background job ends with `&`, which takes no `;`)."""
    line = ""
    for command in commands:
        line += command + (" " if command.endswith("&") else "; ")
    return line.rstrip("; ")


def parse_snapshot(output: Iterable[str]) -> NodeSnapshot:
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    docker: dict[tuple[str, str], list[str]] = {}
    current: list[str] | None = None
    for line in output:
        kind, _, argument = line[2:].partition(" ")
        if line.startswith("##") and line[2:] in sections:
            current = sections[line[2:]]
        elif line.startswith("##") and kind in DOCKER_SECTIONS:
            current = docker.setdefault((kind, argument), [])
        elif current is not None:
            current.append(line)
    parsed = NodeSnapshot()
    for (kind, argument), lines in docker.items():
        if kind == "image":
            parsed.images[argument] = parse_image(lines)
        elif kind == "container":
            parsed.containers[argument] = parse_container(lines)
        else:
            parsed.docker_info_asked = True
            parsed.docker_info = parse_docker_info(lines)
    sha1s = {}
    for line in sections["sha1"]:
        digest, _, path = line.partition("  ")
        if path:
            sha1s[path] = digest
    for line in sections["stat"]:
        parts = line.split("|", 4)
        if len(parts) == 5:
            kind, mode, user, group, path = parts
            parsed.paths[path] = PathState(kind, int(mode, 8), user, group, sha1s.get(path))
    for line in sections["list"]:
        directory, _, _name = line.rstrip("/").rpartition("/")
        parsed.listed.setdefault(directory, []).append(line)
    for line in sections["sysctl"]:
        key, sep, value = line.partition("=")
        if sep:
            parsed.sysctls[key.strip()] = " ".join(value.split())
    unit = None
    for line in sections["units"]:
        key, _, value = line.strip().partition("=")
        if key == "Id":
            unit = value
        elif unit and key == "SubState":
            parsed.active[unit] = value in (
                "running",
                "waiting",
                "exited",
                "listening",
                "mounted",
            )
        elif unit and key == "UnitFileState":
            parsed.enabled[unit] = value in ("enabled", "static")
    parsed.packages = DebPackages().process(sections["packages"]) or {}  # type: ignore[no-untyped-call]
    host_lines = sections["host"]
    if host_lines:
        parsed.hostname = host_lines[0].strip()
    if len(host_lines) > 1:
        parsed.timezone = host_lines[1].strip()
    return parsed


@dataclass(frozen=True)
class Probes:
    """What a role wants in the snapshot besides its planned files (`snapshot_probes`)."""

    paths: tuple[str, ...] = ()  # files and directories it writes outside its plan
    directories: tuple[str, ...] = ()  # directories whose entries it lists
    sysctls: tuple[str, ...] = ()
    units: tuple[str, ...] = ()  # systemd units it starts or enables
    images: tuple[str, ...] = ()  # image references it inspects
    containers: tuple[str, ...] = ()  # container names it inspects
    docker_info: bool = False  # whether it reads `docker info`


# The snapshot of each host of this run, keyed by host name; filled by `take_snapshot`.
_SNAPSHOTS: dict[str, NodeSnapshot] = {}


def take_snapshot(
    paths: Iterable[str],
    directories: Iterable[str] = (),
    sysctls: Iterable[str] = (),
    units: Iterable[str] = (),
    images: Iterable[str] = (),
    containers: Iterable[str] = (),
    docker_info: bool = False,
) -> NodeSnapshot:
    directories = sorted(set(directories))
    images, containers = sorted(set(images)), sorted(set(containers))
    taken = host.get_fact(
        NodeSnapshotFact,
        paths=tuple(sorted(set(paths))),
        directories=tuple(directories),
        sysctls=tuple(sorted(set(sysctls))),
        units=tuple(sorted({unit_name(u) for u in units})),
        images=tuple(images),
        containers=tuple(containers),
        docker_info=docker_info,
    )
    for directory in directories:
        taken.listed.setdefault(directory, [])  # asked, and empty or missing
    # Asked and not answered (no docker yet): absent, as the plain facts would say.
    for ref in images:
        taken.images.setdefault(ref, None)
    for name in containers:
        taken.containers.setdefault(name, None)
    taken.docker_info_asked = taken.docker_info_asked or docker_info
    _SNAPSHOTS[host.name] = taken
    return taken


def snapshot() -> NodeSnapshot | None:
    return _SNAPSHOTS.get(host.name)


def forget() -> None:
    """Drop this host's snapshot (tests; a second deploy in one process)."""
    _SNAPSHOTS.pop(host.name, None)


def file_matches(path: str, content: bytes, mode: str, user: str, group: str) -> bool:
    """True only when the snapshot shows this exact file; False when unknown."""
    current = snapshot()
    state = current.paths.get(path) if current else None
    return (
        state is not None
        and state.kind == "regular file"
        and state.sha1 == hashlib.sha1(content).hexdigest()
        and state.mode == int(mode, 8)
        and state.user == user
        and state.group == group
    )


def directory_matches(path: str, mode: str | None = None, user: str | None = None) -> bool:
    """True only when the snapshot shows a directory there (with that mode and owner)."""
    current = snapshot()
    state = current.paths.get(path) if current else None
    return (
        state is not None
        and state.kind == "directory"
        and (mode is None or state.mode == int(mode, 8))
        and (user is None or state.user == user)
    )


def listed(directory: str) -> list[str] | None:
    """The entries of a directory asked for in the snapshot (None: not asked)."""
    current = snapshot()
    if current is None or directory not in current.listed:
        return None
    return sorted(current.listed[directory])


def unit_name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def unit_is(unit: str, *, running: bool | None, enabled: bool | None) -> bool:
    """True only when the snapshot shows the unit already in the wanted state."""
    current = snapshot()
    if current is None:
        return False
    name = unit_name(unit)
    if running is not None and current.active.get(name) is not running:
        return False
    return enabled is None or current.enabled.get(name) is enabled


def sysctl_is(key: str, value: str) -> bool:
    current = snapshot()
    return current is not None and current.sysctls.get(key) == " ".join(str(value).split())


def installed_packages() -> dict[str, Any]:
    """DebPackages for this host: from the snapshot, or asked (each time without one)."""
    current = snapshot()
    if current is None:
        return host.get_fact(DebPackages) or {}
    return current.packages


def docker_image(ref: str) -> ImageState | None:
    """The node's image REF: from the snapshot when it was asked there, else the fact."""
    current = snapshot()
    if current is not None and ref in current.images:
        return current.images[ref]
    return host.get_fact(DockerImage, ref=ref)


def engine_container(name: str) -> ContainerState | None:
    """The node's container NAME: from the snapshot when it was asked there, else the fact."""
    current = snapshot()
    if current is not None and name in current.containers:
        return current.containers[name]
    return host.get_fact(EngineContainer, container=name)


def docker_info_before_run() -> tuple[bool, dict[str, Any] | None]:
    """Whether the snapshot read `docker info`, and its answer (None: no daemon answered).

    Only for a check made before the run executes, or when nothing in it touched Docker."""
    current = snapshot()
    if current is None or not current.docker_info_asked:
        return False, None
    return True, current.docker_info
