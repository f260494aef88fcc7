"""End-to-end: real lab nodes (systemd + sshd in network namespaces) behave like small hosts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from infra.cli import main
from infra.lab import down, find_leftovers, up
from infra.lab.plan import NETNS_PREFIX, VETH_PREFIX
from tests.e2e.conftest import Lab

pytestmark = pytest.mark.lab


def test_nodes_answer_ssh_with_their_own_name_and_address(lab: Lab) -> None:
    for node in lab.plan.nodes:
        result = lab.ssh(node.name, "hostname; ip -4 -o addr show dev host0")
        assert result.returncode == 0, result.stderr
        hostname, addresses = result.stdout.split("\n", 1)
        assert hostname == node.name
        assert f"{node.address}/24" in addresses


def test_real_systemd_runs_in_each_node(lab: Lab) -> None:
    result = lab.ssh(lab.plan.nodes[0].name, "systemctl is-system-running --wait")
    assert result.stdout.strip() in {"running", "degraded"}, result.stdout + result.stderr
    result = lab.ssh(lab.plan.nodes[0].name, "systemctl is-active ssh")
    assert result.stdout.strip() == "active"


def test_nodes_have_no_default_route(lab: Lab) -> None:
    for node in lab.plan.nodes:
        result = lab.ssh(node.name, "ip route show default; ip route get 1.1.1.1")
        assert result.stdout.strip() == ""
        assert "unreachable" in result.stderr


def test_nodes_reach_each_other_over_the_bridge(lab: Lab) -> None:
    first, second = lab.plan.nodes[0], lab.plan.nodes[-1]
    result = lab.ssh(first.name, f"ping -c1 -W2 {second.address}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_apt_goes_through_the_cache(lab: Lab) -> None:
    node = next(n for n in lab.plan.nodes if "gpu" in n.groups)
    result = lab.ssh(node.name, "apt-config dump Acquire::http::Proxy && apt-get update")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'"{lab.plan.apt_proxy}"' in result.stdout
    # The cache stored what it fetched: the next node's update is served locally.
    assert any(lab.paths.acng_cache.iterdir())


def test_model_storage_is_read_only(lab: Lab) -> None:
    marker = Path(lab.plan.models_dir) / "lab-test-marker"
    marker.write_text("visible\n")
    try:
        node = lab.plan.nodes[-1].name
        read = lab.ssh(node, f"cat {lab.plan.models_mount}/lab-test-marker")
        assert read.stdout == "visible\n"
        write = lab.ssh(node, f"touch {lab.plan.models_mount}/new-file")
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr
    finally:
        marker.unlink()


def test_status_json_describes_the_running_lab(
    lab: Lab, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(lab.paths.state.parent)
    assert main(["lab", "status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in document["nodes"]] == [n.name for n in lab.plan.nodes]
    assert {n["state"] for n in document["nodes"]} == {"running"}
    assert document["endpoint"] == "http://10.77.0.10:8000"
    assert document["ssh_key"] == ".lab/ssh/id_ed25519"
    assert document["api_key"] == lab.paths.api_key.read_text().strip()
    assert stat.S_IMODE(lab.paths.api_key.stat().st_mode) == 0o600


def test_lab_ssh_command_runs_a_remote_command(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(lab.paths.state.parent)
    assert main(["lab", "ssh", "lb-01", "--", "test", "$(hostname)", "=", "lb-01"]) == 0
    assert main(["lab", "ssh", "lb-01", "--", "false"]) == 1


def test_up_twice_leaves_running_nodes_alone(lab: Lab) -> None:
    before = json.loads(lab.paths.state_file.read_text())
    report = up(lab.plan, lab.paths)
    assert report.started == []
    assert report.already_running == [n.name for n in lab.plan.nodes]
    after = json.loads(lab.paths.state_file.read_text())
    assert [n["pid"] for n in after["nodes"]] == [n["pid"] for n in before["nodes"]]


def _nspid(pid: str) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""  # a short-lived process of the booting node, already gone
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return line
    return ""


def test_up_restarts_a_node_whose_nspawn_was_killed(lab: Lab) -> None:
    node = lab.plan.nodes[-1]
    state = json.loads(lab.paths.state_file.read_text())
    pid = next(n["pid"] for n in state["nodes"] if n["name"] == node.name)
    os.kill(pid, signal.SIGKILL)  # the container's systemd survives this: up must clear it
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # our child when this session's `up` started it
    report = up(lab.plan, lab.paths)
    assert report.started == [node.name]
    pids = subprocess.run(
        ["ip", "netns", "pids", node.netns], capture_output=True, text=True, check=True
    ).stdout.split()
    # A container's init is PID 1 in its own PID namespace (last field of NSpid).
    inits = [p for p in pids if _nspid(p).endswith(" 1") or _nspid(p).endswith("\t1")]
    assert len(inits) == 1, "exactly one init boots on the node's root"
    assert lab.ssh(node.name, "hostname").stdout.strip() == node.name


def _host_snapshot() -> tuple[str, str, str, str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    mounts = Path("/proc/self/mounts").read_text()
    listing = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True)
    # Zombies are already dead; they wait for a parent (maybe this test process) to reap them.
    procs = "\n".join(
        line for line in listing.stdout.splitlines() if not line.lstrip().startswith("Z")
    )
    return netns, links, mounts, procs


def test_down_leaves_nothing_behind_even_without_state(lab: Lab) -> None:
    """Runs last in this module; brings the lab back afterwards for e2e modules that follow."""
    # Simulate a half-failed `up`: a corrupt state file and a namespace + veth of a node that
    # never booted.
    subprocess.run(["ip", "netns", "add", f"{NETNS_PREFIX}stray"], check=True)
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            f"{VETH_PREFIX}stray",
            "type",
            "veth",
            "peer",
            "name",
            "host0",
            "netns",
            f"{NETNS_PREFIX}stray",
        ],
        check=True,
    )
    lab.paths.state_file.write_text("{not json")

    down(lab.paths, [lab.plan.bridge])

    assert find_leftovers(lab.paths, [lab.plan.bridge]).clean
    netns, links, mounts, procs = _host_snapshot()
    assert NETNS_PREFIX not in netns
    assert VETH_PREFIX not in links and f"{lab.plan.bridge}:" not in links
    assert str(lab.paths.nodes_root) not in mounts and "/run/netns/" not in mounts
    assert "systemd-nspawn" not in procs
    assert str(lab.paths.acng_dir) not in procs
    assert not lab.paths.state_file.exists()
    # The rootfs cache and the lab's keys survive: the next `up` is fast and keeps its key.
    assert lab.paths.ssh_key.exists() and os.path.isdir(lab.report.rootfs.path)

    lab.report = up(lab.plan, lab.paths)
    assert lab.report.started == [n.name for n in lab.plan.nodes]
