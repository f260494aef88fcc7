"""Role netplan: the field topology renders to what systemd-networkd needs, checked by netplan."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from infra.render import HostFile
from infra.spec import load_spec
from infra.validators import ConfigRejected, check_netplan
from roles import netplan
from tests.conftest import HOSTS

BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")


def _generated(node: str) -> dict[str, str]:
    role = netplan.plan(BAREMETAL, BAREMETAL.node(node))
    assert role is not None
    return check_netplan([role.files[0]])


@pytest.mark.validators
def test_seed_topology_becomes_bonds_and_storage_vlan() -> None:
    out = _generated("gpu-01")
    bond0 = out["10-netplan-bond0.netdev"]
    for line in (
        "Kind=bond",
        "Mode=802.3ad",
        "LACPTransmitRate=fast",
        "MIIMonitorSec=100ms",
        "TransmitHashPolicy=layer3+4",
        "MTUBytes=1500",
    ):
        assert line in bond0
    assert "MTUBytes=9000" in out["10-netplan-bond1.netdev"]
    vlan = out["10-netplan-bond1.12.netdev"]
    assert "Kind=vlan" in vlan and "Id=12" in vlan
    assert "VLAN=bond1.12" in out["10-netplan-bond1.network"]
    management = out["10-netplan-bond0.network"]
    assert "Address=192.0.2.11/24" in management and "Gateway=192.0.2.1" in management
    assert "DNS=192.0.2.2" in management and "Domains=dc1.example.com" in management
    assert "Address=198.51.100.11/24" in out["10-netplan-bond1.12.network"]
    # Both NIC families are enslaved to their bond, matched by name pattern.
    assert "Bond=bond0" in out["10-netplan-intel.network"]
    assert "Name=ens37f*" in out["10-netplan-intel.network"]
    assert "Bond=bond1" in out["10-netplan-mlx.network"]
    assert "MTUBytes=9000" in out["10-netplan-mlx.network"]


@pytest.mark.validators
def test_nic_matched_by_mac_gets_one_port_each(tmp_path: Path) -> None:
    text = (
        (HOSTS / "example-baremetal.yaml")
        .read_text()
        .replace(
            "{name: eno1, match: eno1}\n      - {name: eno2, match: eno2}\n    addresses:\n"
            "      - {interface: eno1, network: mgmt, address: 192.0.2.20}",
            '{name: mgmt, macs: ["52:54:00:AA:00:01", "52:54:00:aa:00:02"]}\n'
            "      - {name: eno2, match: eno2}\n    bonds:\n      - {name: bond0, members: [mgmt]}\n"
            "    addresses:\n      - {interface: bond0, network: mgmt, address: 192.0.2.20}",
            1,
        )
    )
    path = tmp_path / "mac.yaml"
    path.write_text(text)
    spec = load_spec(path)
    role = netplan.plan(spec, spec.node("lb-01"))
    assert role is not None
    out = check_netplan([role.files[0]])
    assert "MACAddress=52:54:00:aa:00:01" in out["10-netplan-mgmt0.link"]
    assert "Bond=bond0" in out["10-netplan-mgmt1.network"]


def test_file_is_private_and_marked_managed() -> None:
    role = netplan.plan(BAREMETAL, BAREMETAL.node("gpu-01"))
    assert role is not None
    config = role.files[0]
    assert config.path == "/etc/netplan/60-deepfleet.yaml" and config.mode == "600"
    assert config.content.startswith("# Managed by deepfleet")


def test_nodes_without_ports_in_the_spec_have_no_netplan_role() -> None:
    lab = load_spec(HOSTS / "lab.yaml")
    aws = load_spec(HOSTS / "example-aws.yaml")
    assert netplan.plan(aws, aws.node("gpu-01")) is None
    assert all(netplan.plan(lab, n) is None or lab.is_lab for n in lab.nodes)


@pytest.mark.validators
def test_netplan_rejects_a_broken_file() -> None:
    role = netplan.plan(BAREMETAL, BAREMETAL.node("gpu-01"))
    assert role is not None
    broken = role.files[0].content.replace("mode: 802.3ad", "mode: 802.3xx")
    with pytest.raises(ConfigRejected, match="netplan"):
        check_netplan([HostFile(netplan.NETPLAN_FILE, broken, mode="600")])


# --- the apply script: rollback unless confirmed ------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str | Path]:
    role = netplan.plan(BAREMETAL, BAREMETAL.node("gpu-01"))
    assert role is not None
    script = tmp_path / "apply.sh"
    script.write_text(role.files[1].content)
    script.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    # Stand-ins for the node's programs: they record how they were called.
    for name, body in {
        "netplan": 'echo "netplan $*" >> "$CALLS"; [ "$1" != generate ] || ! grep -rq BROKEN "$3/etc/netplan"',
        "systemd-run": 'echo "systemd-run $*" >> "$CALLS"',
        "systemctl": 'echo "systemctl $*" >> "$CALLS"',
        "logger": 'echo "logger $*" >> "$CALLS"',
    }.items():
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    netplan_dir = tmp_path / "netplan"
    netplan_dir.mkdir()
    (netplan_dir / "50-cloud-init.yaml").write_text("network: {version: 2}  # working\n")
    return {
        "script": script,
        "bin": bin_dir,
        "calls": calls,
        "dir": netplan_dir,
        "state": tmp_path / "state",
    }


def _run(box: dict[str, str | Path], verb: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{box['bin']}:{os.environ['PATH']}",
        "CALLS": str(box["calls"]),
        "DEEPFLEET_NETPLAN_DIR": str(box["dir"]),
        "DEEPFLEET_NETPLAN_STATE": str(box["state"]),
    }
    return subprocess.run(
        [str(box["script"]), verb], env=env, capture_output=True, text=True, check=False
    )


def test_unconfirmed_change_rolls_back_to_the_working_config(
    sandbox: dict[str, str | Path],
) -> None:
    netplan_dir = Path(sandbox["dir"])
    assert _run(sandbox, "snapshot").returncode == 0
    (netplan_dir / "50-cloud-init.yaml").unlink()
    (netplan_dir / "60-deepfleet.yaml").write_text("network: {version: 2}  # new\n")
    assert _run(sandbox, "apply").returncode == 0
    calls = Path(sandbox["calls"]).read_text()
    assert (
        f"systemd-run --unit deepfleet-netplan-rollback --on-active={netplan.ROLLBACK_SECONDS}"
        in calls
    )
    assert calls.index("systemd-run") < calls.index("netplan apply")  # armed before applying
    # No confirmation arrives: the timer fires the rollback.
    assert _run(sandbox, "rollback").returncode == 0
    assert sorted(p.name for p in netplan_dir.iterdir()) == ["50-cloud-init.yaml"]
    assert "working" in (netplan_dir / "50-cloud-init.yaml").read_text()


def test_confirmed_change_becomes_the_rollback_target(sandbox: dict[str, str | Path]) -> None:
    netplan_dir = Path(sandbox["dir"])
    _run(sandbox, "snapshot")
    (netplan_dir / "60-deepfleet.yaml").write_text("network: {version: 2}  # new\n")
    assert _run(sandbox, "apply").returncode == 0
    assert _run(sandbox, "confirm").returncode == 0
    assert "systemctl stop deepfleet-netplan-rollback.timer" in Path(sandbox["calls"]).read_text()
    assert (Path(sandbox["state"]) / "confirmed" / "60-deepfleet.yaml").exists()


def test_invalid_config_is_never_applied(sandbox: dict[str, str | Path]) -> None:
    netplan_dir = Path(sandbox["dir"])
    _run(sandbox, "snapshot")
    (netplan_dir / "50-cloud-init.yaml").write_text("BROKEN\n")
    result = _run(sandbox, "apply")
    assert result.returncode == 1
    calls = Path(sandbox["calls"]).read_text()
    assert "netplan apply" not in calls and "systemd-run" not in calls
    assert "working" in (netplan_dir / "50-cloud-init.yaml").read_text()
