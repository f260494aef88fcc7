"""Role netplan: the field topology renders to what systemd-networkd needs, checked by netplan."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pyinfra.api.config import Config
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State

from infra.render import HostFile
from infra.spec import ClusterSpec, load_spec
from infra.validators import ConfigRejected, check_netplan
from roles import _state, netplan
from tests.conftest import HOSTS
from tests.operations.harness import Case, run_case

BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
LAB = load_spec(HOSTS / "lab.yaml")


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


# --- the deploy: validated on the controller, confirmed over a new connection -------------


@pytest.mark.validators
@pytest.mark.parametrize(
    ("spec", "node"), [(BAREMETAL, "gpu-01"), (LAB, "gpu-01")], ids=["baremetal", "lab"]
)
def test_a_file_netplan_rejects_stops_the_deploy_before_any_operation(
    spec: ClusterSpec, node: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = netplan.render_netplan
    monkeypatch.setattr(
        netplan,
        "render_netplan",
        lambda s, n: real(s, n).replace(
            "renderer: networkd", "renderer: networkd\n  frobnicate: 1"
        ),
    )
    inventory = Inventory(([(f"@fake/{node}", {})], {}))  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    (fake,) = list(inventory)
    state.activate_host(fake)
    with pytest.raises(DeployError) as raised:
        add_deploy(state, netplan.apply, spec=spec, node=spec.node(node))
    message = str(raised.value)
    assert message.startswith(
        f"{node}: netplan generate rejected the rendered {netplan.NETPLAN_FILE}"
    )
    # netplan's own words, at the node's path with line and column (not its scratch copy's)
    assert (
        f"\n{netplan.NETPLAN_FILE}:5:3: Error in network definition: unknown key 'frobnicate'"
        in message
    )
    assert "/tmp" not in message
    assert f"fix nodes[{node}]" in message
    assert state.get_op_order() == []  # raised while preparing: nothing was queued, let alone run


@pytest.mark.parametrize(("on_node", "checked"), [("as planned", 0), ("hand-edited", 1)])
def test_only_a_file_about_to_be_written_is_checked(
    on_node: str, checked: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = BAREMETAL.node("gpu-01")
    role = netplan.plan(BAREMETAL, node)
    assert role is not None
    config = role.files[0]
    content = config.content if on_node == "as planned" else config.content + "# edited\n"
    calls: list[list[HostFile]] = []
    monkeypatch.setattr(netplan, "check_netplan", lambda files: calls.append(files) or {})
    inventory = Inventory(([("@fake/gpu-01", {})], {}))  # type: ignore[no-untyped-call]
    state = State(inventory, Config())  # type: ignore[no-untyped-call]
    (fake,) = list(inventory)
    state.activate_host(fake)
    script = role.files[1]

    def sha1(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    # The rest of the role converged, so that preparing it asks the @fake host nothing.
    snapshot = _state.NodeSnapshot(
        paths={
            config.path: _state.PathState("regular file", 0o600, "root", "root", sha1(content)),
            script.path: _state.PathState(
                "regular file", 0o755, "root", "root", sha1(script.content)
            ),
            f"{netplan.STATE_DIR}/confirmed": _state.PathState("directory", 0o755, "root", "root"),
        },
        listed={netplan.NETPLAN_DIR: [config.path]},
        packages={"netplan.io": ["1.1.2"]},
    )
    monkeypatch.setitem(_state._SNAPSHOTS, fake.name, snapshot)
    add_deploy(state, netplan.apply, spec=BAREMETAL, node=node)
    assert [[f.path for f in files] for files in calls] == [[config.path]] * checked


APPLY_STEP = "[netplan] Apply the network config (rolls back by itself unless confirmed)"
RECONNECT_STEP = "[netplan] Open a new SSH connection to the node"
CONFIRM_STEP = "[netplan] Confirm the network config over the new connection"


def _deploy_case(netplan_files: dict[str, str], converged: bool) -> Case:
    """gpu-01 with netplan.io installed and NETPLAN_FILES in /etc/netplan; converged: the
    role's files are there as planned (mode included) and a confirmed config is kept."""
    owned = {netplan.NETPLAN_FILE: 600, netplan.APPLY_SCRIPT: 755} if converged else {}
    stat_of = {"user": "root", "group": "root", "size": 1, "mtime": datetime(2026, 1, 1)}
    return Case(
        Path("netplan/inline.json"),
        {
            "spec": "hosts/example-baremetal.yaml",
            "node": "gpu-01",
            "os": "ubuntu-24.04",
            "planned_files": converged,
            "remote_files": netplan_files,
            "facts": {
                "deb.DebPackages": {"netplan.io": ["1.1.2"]},
                "files.FindFiles": sorted({*netplan_files, *owned}),
                "files.File": {f"path={p}": {**stat_of, "mode": m} for p, m in owned.items()},
                "files.Directory": {
                    f"path={netplan.STATE_DIR}/confirmed": {
                        "user": "root",
                        "group": "root",
                        "mode": 755,
                    }
                }
                if converged
                else {},
            },
        },
    )


@pytest.mark.validators
def test_a_changed_config_is_confirmed_only_after_a_new_connection() -> None:
    cloud_init = "/etc/netplan/50-cloud-init.yaml"
    result = run_case(_deploy_case({cloud_init: "network: {version: 2}\n"}, False), netplan)
    assert not result.failed, result.errors
    steps = list(result.commands)
    assert steps.index(APPLY_STEP) < steps.index(RECONNECT_STEP) < steps.index(CONFIRM_STEP)
    assert result.commands[APPLY_STEP] == [f"{netplan.APPLY_SCRIPT} apply"]
    assert result.commands[RECONNECT_STEP] == ["python:_reconnect"]
    assert result.commands[CONFIRM_STEP] == [f"{netplan.APPLY_SCRIPT} confirm"]


@pytest.mark.validators
def test_an_unchanged_config_is_neither_applied_nor_confirmed() -> None:
    result = run_case(_deploy_case({}, converged=True), netplan)
    assert not result.failed, result.errors
    assert not {APPLY_STEP, RECONNECT_STEP, CONFIRM_STEP} & set(result.commands)


class _Client:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Host:
    """What `_reconnect` uses of a pyinfra host; connects after `fails` failed attempts."""

    def __init__(self, fails: int) -> None:
        self.old_client = _Client()
        self.connector = SimpleNamespace(client=self.old_client)
        self.connector_data = {"sudo_askpass_path": "/tmp/askpass"}
        self.connected = True
        self.fails = fails
        self.calls: list[str] = []
        self.logged: list[str] = []

    def disconnect(self) -> None:
        self.calls.append("disconnect")
        self.connected = False

    def connect(self, reason: str | None = None, show_errors: bool = True) -> None:
        self.calls.append("connect")
        if self.calls.count("connect") > self.fails:
            self.connector.client = _Client()
            self.connected = True

    def log_styled(self, message: str, **kwargs: Any) -> None:
        self.logged.append(message)


def test_reconnect_replaces_the_connection_that_applied() -> None:
    host = _Host(fails=2)
    assert netplan._reconnect(None, host, "gpu-01", deadline_s=5, interval_s=0)
    assert host.calls == ["disconnect", "connect", "connect", "connect"]
    assert host.old_client.closed and host.connector.client is not host.old_client
    # The sudo askpass file is forgotten, never removed over a connection that may be dead.
    assert host.connector_data["sudo_askpass_path"] is None


def test_no_new_connection_fails_the_host_naming_node_and_rollback() -> None:
    host = _Host(fails=10**6)
    assert netplan._reconnect(None, host, "gpu-01", deadline_s=0, interval_s=0) is False
    (message,) = host.logged
    assert message.startswith("gpu-01: no new SSH connection")
    assert f"by itself {netplan.ROLLBACK_SECONDS} s after applying" in message


# --- the apply script: rollback unless confirmed over a new connection ---------------------

# $SSH_CONNECTION of two SSH connections from the controller: same addresses, another port.
APPLYING = "192.0.2.50 40022 192.0.2.11 22"
NEW = "192.0.2.50 40023 192.0.2.11 22"


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


def _run(
    box: dict[str, str | Path], verb: str, over: str | None, *, behind_sudo: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the script as if over the SSH connection `over` (None: not over SSH).

    behind_sudo: the script's own environment lacks SSH_CONNECTION and only its parent has it,
    as under sudo's env_reset."""
    env = {
        **os.environ,
        "PATH": f"{box['bin']}:{os.environ['PATH']}",
        "CALLS": str(box["calls"]),
        "DEEPFLEET_NETPLAN_DIR": str(box["dir"]),
        "DEEPFLEET_NETPLAN_STATE": str(box["state"]),
    }
    env.pop("SSH_CONNECTION", None)
    if over is not None:
        env["SSH_CONNECTION"] = over
    command = [str(box["script"]), verb]
    if behind_sudo:
        # `; exit` keeps sh from exec'ing env: sh stays the parent and keeps SSH_CONNECTION.
        command = ["sh", "-c", 'env -u SSH_CONNECTION "$@"; exit $?', "sh", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False)


def _first_deploy_writes(netplan_dir: Path, content: str) -> None:
    """What the role does on a first deploy: its file in, the installer's file out."""
    (netplan_dir / "60-deepfleet.yaml").write_text(content)
    (netplan_dir / "50-cloud-init.yaml").unlink()


def _listing(netplan_dir: Path) -> list[str]:
    return sorted(p.name for p in netplan_dir.iterdir())


def test_unconfirmed_change_rolls_back_to_the_working_config(
    sandbox: dict[str, str | Path],
) -> None:
    netplan_dir = Path(sandbox["dir"])
    assert _run(sandbox, "snapshot", APPLYING).returncode == 0
    _first_deploy_writes(netplan_dir, "network: {version: 2}  # new\n")
    assert _run(sandbox, "apply", APPLYING).returncode == 0
    calls = Path(sandbox["calls"]).read_text()
    assert (
        f"systemd-run --unit deepfleet-netplan-rollback --on-active={netplan.ROLLBACK_SECONDS}"
        in calls
    )
    assert calls.index("systemd-run") < calls.index("netplan apply")  # armed before applying
    # No confirmation arrives: the timer fires the rollback.
    assert _run(sandbox, "rollback", None).returncode == 0
    assert _listing(netplan_dir) == ["50-cloud-init.yaml"]
    assert "working" in (netplan_dir / "50-cloud-init.yaml").read_text()


@pytest.mark.parametrize("behind_sudo", [False, True], ids=["as-root", "behind-sudo"])
def test_confirmed_change_becomes_the_rollback_target(
    sandbox: dict[str, str | Path], behind_sudo: bool
) -> None:
    netplan_dir = Path(sandbox["dir"])
    _run(sandbox, "snapshot", APPLYING)
    (netplan_dir / "60-deepfleet.yaml").write_text("network: {version: 2}  # new\n")
    assert _run(sandbox, "apply", APPLYING, behind_sudo=behind_sudo).returncode == 0
    result = _run(sandbox, "confirm", NEW, behind_sudo=behind_sudo)
    assert result.returncode == 0, result.stderr
    assert "systemctl stop deepfleet-netplan-rollback.timer" in Path(sandbox["calls"]).read_text()
    assert (Path(sandbox["state"]) / "confirmed" / "60-deepfleet.yaml").exists()
    assert not (Path(sandbox["state"]) / "applied-over").exists()


@pytest.mark.parametrize("behind_sudo", [False, True], ids=["as-root", "behind-sudo"])
def test_confirm_over_the_applying_connection_is_refused_and_the_timer_rolls_back(
    sandbox: dict[str, str | Path], behind_sudo: bool
) -> None:
    netplan_dir, calls = Path(sandbox["dir"]), Path(sandbox["calls"])
    _run(sandbox, "snapshot", APPLYING)
    _first_deploy_writes(netplan_dir, "network: {version: 2}  # new\n")
    assert _run(sandbox, "apply", APPLYING, behind_sudo=behind_sudo).returncode == 0
    before = calls.read_text()
    result = _run(sandbox, "confirm", APPLYING, behind_sudo=behind_sudo)
    assert result.returncode == 1
    assert f"the SSH connection that applied the change ({APPLYING})" in result.stderr
    assert calls.read_text() == before  # the rollback timer was not stopped
    confirmed = Path(sandbox["state"]) / "confirmed"
    assert sorted(p.name for p in confirmed.iterdir()) == ["50-cloud-init.yaml"]
    # The timer fires: the working config is back.
    assert _run(sandbox, "rollback", None).returncode == 0
    assert _listing(netplan_dir) == ["50-cloud-init.yaml"]
    assert "working" in (netplan_dir / "50-cloud-init.yaml").read_text()


def _over_ssh_already() -> bool:
    """Whether some ancestor of this test run has SSH_CONNECTION (the script would find it)."""
    pid = os.getpid()
    while pid > 1:
        try:
            if b"\0SSH_CONNECTION=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                return True
        except OSError:
            pass  # another user's process: the script, run as the same user, cannot read it either
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


@pytest.mark.skipif(_over_ssh_already(), reason="this test run itself is under an SSH session")
def test_confirm_outside_ssh_is_refused(sandbox: dict[str, str | Path]) -> None:
    netplan_dir = Path(sandbox["dir"])
    _run(sandbox, "snapshot", APPLYING)
    (netplan_dir / "60-deepfleet.yaml").write_text("network: {version: 2}  # new\n")
    assert _run(sandbox, "apply", APPLYING).returncode == 0
    result = _run(sandbox, "confirm", None)
    assert result.returncode == 1 and "not an SSH session" in result.stderr
    assert not (Path(sandbox["state"]) / "confirmed" / "60-deepfleet.yaml").exists()


def test_invalid_config_is_never_applied(sandbox: dict[str, str | Path]) -> None:
    netplan_dir = Path(sandbox["dir"])
    _run(sandbox, "snapshot", APPLYING)
    (netplan_dir / "50-cloud-init.yaml").write_text("BROKEN\n")
    result = _run(sandbox, "apply", APPLYING)
    assert result.returncode == 1
    calls = Path(sandbox["calls"]).read_text()
    assert "netplan apply" not in calls and "systemd-run" not in calls
    assert "working" in (netplan_dir / "50-cloud-init.yaml").read_text()


def test_first_deploy_of_a_config_the_node_rejects_leaves_only_the_working_config(
    sandbox: dict[str, str | Path],
) -> None:
    netplan_dir = Path(sandbox["dir"])
    assert _run(sandbox, "snapshot", APPLYING).returncode == 0
    _first_deploy_writes(netplan_dir, "BROKEN\n")
    result = _run(sandbox, "apply", APPLYING)
    assert result.returncode == 1 and "netplan rejected the new config" in result.stderr
    # The rejected file is gone: the next boot's generator finds only the working config.
    assert _listing(netplan_dir) == ["50-cloud-init.yaml"]
    assert "working" in (netplan_dir / "50-cloud-init.yaml").read_text()
    assert "netplan apply" not in Path(sandbox["calls"]).read_text()
