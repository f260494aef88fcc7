#!/usr/bin/python3
"""Which RoCE GID index NCCL should use, from the GID table in sysfs.

One file, two uses, so the deploy's check and the engines pick the same entry:
- imported on the controller, where the mellanox role checks the table it read with the
  `facts.rdma.RoceGids` fact (`choose_index`: the same words, before any engine starts);
- installed on GPU nodes as ``deepfleet-nccl-env`` (roles/sglang.py). Each engine unit runs it
  before ``docker run`` (ExecStartPre): it reads the table at that moment and writes
  ``NCCL_IB_GID_INDEX=N`` to the env file the container reads. The index moves when addresses
  are added in another order (a VLAN address after a reboot, say), so it is read at every start,
  not once at deploy time.

Standard library only: it runs on the python3 of Ubuntu 22.04 and 24.04, outside any virtualenv.

    deepfleet-nccl-env --out /run/deepfleet/UNIT.nccl.env mlx5_0:1:bond1.12 mlx5_1:1:bond1.12
    deepfleet-nccl-env --out - mlx5_0:1:bond1.12 ...    # print it: `deepfleet check` compares
                                                         # it with what running engines read

Exit 1, with the reason on stderr (the unit's journal), when a port has no RoCE v2 GID with
an IPv4 address, or when the ports' indexes differ (NCCL takes one index for every device).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import NamedTuple, TypedDict

IPV4_MAPPED_PREFIX = "0000:0000:0000:0000:0000:ffff:"
ROCE_V2 = "RoCE v2"
VARIABLE = "NCCL_IB_GID_INDEX"


class Gid(TypedDict):
    device: str
    port: int
    index: int
    gid: str
    netdev: str | None
    type: str  # "IB/RoCE v1" or "RoCE v2"


class Port(NamedTuple):
    """A port NCCL uses (the spec's rdma entry): DEVICE:PORT[:NETDEV] on the command line."""

    device: str
    port: int
    netdev: str | None

    @classmethod
    def parse(cls, text: str) -> Port:
        device, _, rest = text.partition(":")
        port, _, netdev = rest.partition(":")
        if not device or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: expected DEVICE:PORT[:NETDEV]")
        return cls(device, int(port), netdev or None)

    def __str__(self) -> str:
        return f"{self.device} port {self.port}"


def gid_ipv4(gid: str) -> IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped GID (::ffff:a.b.c.d), else None."""
    if not gid.startswith(IPV4_MAPPED_PREFIX):
        return None
    high, low = gid[len(IPV4_MAPPED_PREFIX) :].split(":")
    return IPv4Address(int(high + low, 16))


def nccl_gid_index(
    gids: Sequence[Gid], device: str, port: int = 1, netdev: str | None = None
) -> int | None:
    """The GID index NCCL should use on DEVICE/PORT: RoCE v2 with an IPv4-mapped address.

    With several such entries (addresses on several VLANs), the one on NETDEV wins; otherwise
    the lowest index. None when the port has no RoCE v2 IPv4 GID (no address on its netdev).
    """
    candidates = [
        g
        for g in gids
        if g["device"] == device
        and g["port"] == port
        and g["type"] == ROCE_V2
        and gid_ipv4(g["gid"]) is not None
    ]
    if netdev is not None and any(g["netdev"] == netdev for g in candidates):
        candidates = [g for g in candidates if g["netdev"] == netdev]
    return min((g["index"] for g in candidates), default=None)


def read_gids(sysfs: Path, ports: Sequence[Port]) -> list[Gid]:
    """The populated GID entries of PORTS, read the way `show_gids` does."""
    gids: list[Gid] = []
    for wanted in ports:
        base = sysfs / "class/infiniband" / wanted.device / "ports" / str(wanted.port)
        types = base / "gid_attrs/types"
        if not types.is_dir():
            continue
        for entry in sorted(types.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
            try:
                # Unpopulated entries fail to read (EINVAL): skip them, as show_gids does.
                gid_type = entry.read_text().strip()
                gid = (base / "gids" / entry.name).read_text().strip()
            except OSError:
                continue
            if not gid_type or not entry.name.isdigit() or set(gid.replace(":", "")) <= {"0"}:
                continue
            try:
                netdev: str | None = (base / "gid_attrs/ndevs" / entry.name).read_text().strip()
            except OSError:
                netdev = None
            gids.append(
                Gid(
                    device=wanted.device,
                    port=wanted.port,
                    index=int(entry.name),
                    gid=gid,
                    netdev=netdev or None,
                    type=gid_type,
                )
            )
    return gids


def choose_index(gids: Sequence[Gid], ports: Sequence[Port]) -> tuple[int | None, list[str]]:
    """The one index for every port, or None and what is wrong, in words."""
    found = {p: nccl_gid_index(gids, p.device, p.port, p.netdev) for p in ports}
    problems = [
        f"{p}: no RoCE v2 GID with an IPv4 address"
        + (f" on {p.netdev}" if p.netdev else "")
        + f" (is the address up? check with `show_gids {p.device}`)"
        for p, index in found.items()
        if index is None
    ]
    indexes = {index for index in found.values() if index is not None}
    if not problems and len(indexes) > 1:
        problems.append(
            "RoCE ports disagree on the GID index ("
            + ", ".join(f"{p}: {index}" for p, index in found.items())
            + f") and {VARIABLE} takes one value: give every RoCE netdev its addresses in the "
            "same order (netplan)"
        )
    if problems:
        return None, problems
    return indexes.pop(), []


def env_text(index: int, ports: Sequence[Port]) -> str:
    return (
        "# Written by deepfleet-nccl-env when the engine started, from the RoCE GID table of "
        + ", ".join(str(p) for p in ports)
        + ".\n"
        + f"{VARIABLE}={index}\n"
    )


def write_env(path: Path, text: str) -> None:
    """Replace PATH in one rename, so a container never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(scratch, 0o644)
        os.replace(scratch, path)
    except BaseException:
        os.unlink(scratch)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deepfleet-nccl-env",
        description=f"Write {VARIABLE} for NCCL from the RoCE GID table.",
    )
    parser.add_argument(
        "--out", required=True, help="the env file to write; - prints it (deepfleet check)"
    )
    parser.add_argument("--sysfs", type=Path, default=Path("/sys"), help=argparse.SUPPRESS)
    parser.add_argument("ports", nargs="+", type=Port.parse, metavar="DEVICE:PORT[:NETDEV]")
    args = parser.parse_args(argv)
    index, problems = choose_index(read_gids(args.sysfs, args.ports), args.ports)
    if index is None:
        for problem in problems:
            print(f"deepfleet-nccl-env: {problem}", file=sys.stderr)
        return 1
    report = f"deepfleet-nccl-env: {VARIABLE}={index} for " + ", ".join(map(str, args.ports))
    if args.out == "-":
        sys.stdout.write(env_text(index, args.ports))
        print(report, file=sys.stderr)
    else:
        write_env(Path(args.out), env_text(index, args.ports))
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
