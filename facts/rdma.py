"""Facts about RDMA NICs (Mellanox ConnectX): ports from `ibstat`, `ibv_devinfo`, `rdma link`,
and the RoCE v2 GID table that tells NCCL which `NCCL_IB_GID_INDEX` to use.

Processing is pure (tests/fixtures/gpu/ holds captured outputs). The helpers at the bottom turn
the facts into what roles need: problems in words naming node/device/port, and NCCL settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypedDict

from pyinfra.api.facts import FactBase

# The GID table and its selection live with the node script the engines run (deepfleet-nccl-env).
from facts.roce_gid import Gid

# --- ibstat ---------------------------------------------------------------------------------


class PortState(TypedDict):
    state: str  # Active, Down, Initializing, ...
    physical_state: str  # LinkUp, Polling, Disabled, ...
    rate_gbps: float | None
    link_layer: str  # "InfiniBand" or "Ethernet"


class CaInfo(TypedDict):
    ca_type: str
    firmware: str
    ports: dict[int, PortState]


def parse_ibstat(lines: list[str]) -> dict[str, CaInfo]:
    cas: dict[str, CaInfo] = {}
    ca: CaInfo | None = None
    port: PortState | None = None
    for raw in lines:
        line = raw.strip()
        if match := re.match(r"^CA '([^']+)'$", line):
            ca = CaInfo(ca_type="", firmware="", ports={})
            cas[match.group(1)] = ca
            port = None
            continue
        if ca is None or ":" not in line:
            continue
        if match := re.match(r"^Port (\d+):$", line):
            port = PortState(state="", physical_state="", rate_gbps=None, link_layer="")
            ca["ports"][int(match.group(1))] = port
            continue
        key, _, value = (part.strip() for part in line.partition(":"))
        if port is None:
            if key == "CA type":
                ca["ca_type"] = value
            elif key == "Firmware version":
                ca["firmware"] = value
        elif key == "State":
            port["state"] = value
        elif key == "Physical state":
            port["physical_state"] = value
        elif key == "Rate":
            port["rate_gbps"] = float(value) if re.fullmatch(r"[0-9.]+", value) else None
        elif key == "Link layer":
            port["link_layer"] = value
    return cas


class IbStat(FactBase[dict[str, CaInfo]]):
    """Every HCA with its ports: `{"mlx5_0": {"ca_type", "firmware", "ports": {1: {...}}}}`."""

    def requires_command(self) -> str:
        return "ibstat"

    def command(self) -> str:
        return "ibstat"

    def process(self, output: list[str]) -> dict[str, CaInfo]:
        return parse_ibstat(output)

    @staticmethod
    def default() -> dict[str, CaInfo]:
        return {}


# --- ibv_devinfo ----------------------------------------------------------------------------


class VerbsPort(TypedDict):
    state: str  # PORT_ACTIVE, PORT_DOWN, ...
    active_mtu: int | None
    link_layer: str


def parse_ibv_devinfo(lines: list[str]) -> dict[str, dict[int, VerbsPort]]:
    devices: dict[str, dict[int, VerbsPort]] = {}
    ports: dict[int, VerbsPort] | None = None
    port: VerbsPort | None = None
    for raw in lines:
        key, _, value = (part.strip() for part in raw.partition(":"))
        if key == "hca_id":
            ports = devices.setdefault(value, {})
            port = None
        elif key == "port" and ports is not None and value.isdigit():
            port = VerbsPort(state="", active_mtu=None, link_layer="")
            ports[int(value)] = port
        elif port is not None and key == "state":
            port["state"] = value.split()[0]
        elif port is not None and key == "active_mtu":
            port["active_mtu"] = int(value.split()[0]) if value.split()[0].isdigit() else None
        elif port is not None and key == "link_layer":
            port["link_layer"] = value
    return devices


class IbvDevinfo(FactBase[dict[str, dict[int, VerbsPort]]]):
    """Verbs' view of the ports (state and active MTU): `{"mlx5_0": {1: {...}}}`."""

    def requires_command(self) -> str:
        return "ibv_devinfo"

    def command(self) -> str:
        return "ibv_devinfo"

    def process(self, output: list[str]) -> dict[str, dict[int, VerbsPort]]:
        return parse_ibv_devinfo(output)

    @staticmethod
    def default() -> dict[str, dict[int, VerbsPort]]:
        return {}


# --- rdma link ------------------------------------------------------------------------------


class RdmaLink(TypedDict):
    device: str
    port: int
    state: str  # ACTIVE, DOWN, ...
    physical_state: str  # LINK_UP, DISABLED, POLLING, ...
    netdev: str | None


def parse_rdma_link(lines: list[str]) -> list[RdmaLink]:
    links: list[RdmaLink] = []
    for line in lines:
        words = line.split()
        if len(words) < 2 or words[0] != "link" or "/" not in words[1]:
            continue
        device, _, port = words[1].partition("/")
        pairs = dict(zip(words[2::2], words[3::2], strict=False))
        links.append(
            RdmaLink(
                device=device,
                port=int(port),
                state=pairs.get("state", ""),
                physical_state=pairs.get("physical_state", ""),
                netdev=pairs.get("netdev"),
            )
        )
    return links


class RdmaLinks(FactBase[list[RdmaLink]]):
    """`rdma link show`: every RDMA port with its state and the net device it is bound to."""

    def requires_command(self) -> str:
        return "rdma"

    def command(self) -> str:
        return "rdma link show"

    def process(self, output: list[str]) -> list[RdmaLink]:
        return parse_rdma_link(output)

    @staticmethod
    def default() -> list[RdmaLink]:
        return []


# --- RoCE GID table (what show_gids prints) ---------------------------------------------------


def parse_gids(lines: list[str]) -> list[Gid]:
    gids: list[Gid] = []
    for line in lines:
        words = line.split(maxsplit=5)
        if len(words) < 6 or not (words[1].isdigit() and words[2].isdigit()):
            continue
        device, port, index, gid, netdev, gid_type = words
        if set(gid.replace(":", "")) == {"0"}:
            continue  # an unused table entry
        gids.append(
            Gid(
                device=device,
                port=int(port),
                index=int(index),
                gid=gid,
                netdev=None if netdev == "-" else netdev,
                type=gid_type.strip(),
            )
        )
    return gids


class RoceGids(FactBase[list[Gid]]):
    """The populated GID table entries of every RDMA port, read from sysfs like show_gids."""

    def command(self) -> str:
        # Unpopulated entries make `cat` fail with EINVAL: those are skipped. A node without
        # RDMA devices leaves the glob unexpanded and prints nothing.
        return (
            "for t in /sys/class/infiniband/*/ports/*/gid_attrs/types/*; do "
            'ty=$(cat "$t" 2>/dev/null) || continue; [ -n "$ty" ] || continue; '
            "i=${t##*/}; p=${t%/gid_attrs/types/*}; port=${p##*/}; d=${p%/ports/*}; "
            'gid=$(cat "$p/gids/$i" 2>/dev/null); nd=$(cat "$p/gid_attrs/ndevs/$i" 2>/dev/null); '
            'echo "${d##*/} $port $i $gid ${nd:--} $ty"; done'
        )

    def process(self, output: list[str]) -> list[Gid]:
        return parse_gids(output)

    @staticmethod
    def default() -> list[Gid]:
        return []


# --- checks against the spec --------------------------------------------------------------------


class WantedPort(TypedDict):
    device: str
    port: int
    link_layer: str  # "infiniband" or "ethernet", as the spec writes it
    rate_gbps: int


def port_problems(
    node: str, wanted: Sequence[WantedPort], ibstat: Mapping[str, CaInfo]
) -> list[str]:
    """Every wanted port that is missing, down, slow or of the wrong link layer, in words."""
    found: list[str] = []
    for want in wanted:
        where = f"{node} {want['device']} port {want['port']}"
        ca = ibstat.get(want["device"])
        if ca is None:
            seen = ", ".join(sorted(ibstat)) or "none"
            found.append(
                f"{where}: device not found (ibstat lists: {seen}); reseat the card or check "
                "that the DOCA-OFED driver (openibd) is loaded"
            )
            continue
        port = ca["ports"].get(want["port"])
        if port is None:
            found.append(f"{where}: no such port (ports: {sorted(ca['ports'])})")
            continue
        if port["state"] != "Active":
            found.append(
                f"{where}: down (state {port['state']}, physical state "
                f"{port['physical_state']}); check the cable/optics and the switch port"
            )
        elif port["rate_gbps"] is not None and port["rate_gbps"] < want["rate_gbps"]:
            found.append(
                f"{where}: runs at {port['rate_gbps']:g} Gb/s, the spec wants "
                f"{want['rate_gbps']} Gb/s; check the optics, cable and switch port speed"
            )
        if port["link_layer"] and port["link_layer"].lower() != want["link_layer"]:
            found.append(
                f"{where}: link layer is {port['link_layer']}, the spec wants "
                f"{want['link_layer']}; set the port type with mlxconfig (LINK_TYPE_P"
                f"{want['port']})"
            )
    return found
