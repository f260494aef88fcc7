"""Fast tests of the lab's pure logic: spec mapping, command lines, leftover parsing, state."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from infra.cli import main
from infra.errors import UserError
from infra.lab import LabPaths, LabState, load_state, plan_from_spec, ssh_argv
from infra.lab import system as lab_system
from infra.lab.leftovers import classify_cmdline, parse_links, parse_mounts, parse_netns
from infra.lab.network import bridge_commands, firewall_ruleset, node_commands
from infra.lab.node import NSPAWN_ENV, host_apt_sources, nspawn_argv, source_suites
from infra.lab.plan import IFNAMSIZ, LabPlan, veth_name
from infra.lab.rootfs import RootfsRecipe
from infra.lab.state import save_state

PROJECT = Path(__file__).resolve().parent.parent
BRIDGE_ADDRESS = IPv4Address("10.77.0.1")


# A stand-in with just the attributes the lab reads, so these tests do not depend on every
# rule of the real spec; one test below also maps the real hosts/lab.yaml.
@dataclass
class FakeNode:
    name: str
    groups: list[str]
    address: IPv4Address | None


@dataclass
class FakeNetwork:
    name: str
    cidr: IPv4Network


@dataclass
class FakeLab:
    bridge: str = "dflab0"
    network: str = "lab"
    host_address: IPv4Address = BRIDGE_ADDRESS
    models_dir: str = "/var/lib/deepfleet-lab/models"


@dataclass
class FakeSpec:
    name: str = "lab"
    nodes: list[FakeNode] = field(
        default_factory=lambda: [
            FakeNode("infra-01", ["nat", "storage", "monitoring"], IPv4Address("10.77.0.20")),
            FakeNode("gpu-01", ["gpu"], IPv4Address("10.77.0.11")),
            FakeNode("lb-01", ["lb"], IPv4Address("10.77.0.10")),
            FakeNode("gpu-02", ["gpu"], IPv4Address("10.77.0.12")),
        ]
    )
    networks: list[FakeNetwork] = field(
        default_factory=lambda: [FakeNetwork("lab", IPv4Network("10.77.0.0/24"))]
    )
    lab: FakeLab | None = field(default_factory=FakeLab)


def plan(nodes: int | None = None) -> LabPlan:
    return plan_from_spec(FakeSpec(), nodes)


def test_nodes_are_ordered_lb_then_gpu_then_the_rest() -> None:
    assert [n.name for n in plan().nodes] == ["lb-01", "gpu-01", "gpu-02", "infra-01"]
    assert [n.name for n in plan(2).nodes] == ["lb-01", "gpu-01"]


def test_plan_carries_bridge_endpoint_and_proxy() -> None:
    lab = plan()
    assert str(lab.host_interface) == "10.77.0.1/24"
    assert lab.endpoint == "http://10.77.0.10:8000"
    assert lab.apt_proxy == "http://10.77.0.1:3142"
    assert lab.models_mount == "/data/models"


def test_plan_without_lb_has_no_endpoint() -> None:
    spec = FakeSpec()
    spec.nodes = [n for n in spec.nodes if "lb" not in n.groups]
    assert plan_from_spec(spec).endpoint is None


@pytest.mark.parametrize("count", [0, 5, -1])
def test_node_count_out_of_range_is_a_user_error(count: int) -> None:
    with pytest.raises(UserError, match=f"--nodes {count}"):
        plan(count)


def test_spec_without_lab_section_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no `lab:` section"):
        plan_from_spec(FakeSpec(lab=None))


def test_addresses_outside_the_lab_network_are_rejected() -> None:
    spec = FakeSpec()
    spec.nodes[0].address = IPv4Address("10.78.0.5")
    spec.nodes[1].address = IPv4Address("10.77.0.1")
    with pytest.raises(UserError) as caught:
        plan_from_spec(spec)
    messages = [p.message for p in caught.value.problems]
    assert any("not in the lab network" in m for m in messages)
    assert any("used twice" in m for m in messages)


def test_unknown_lab_network_names_the_choices() -> None:
    with pytest.raises(UserError) as caught:
        plan_from_spec(FakeSpec(lab=FakeLab(network="nope")))
    assert caught.value.problems[0].hint == "one of: lab"


def test_veth_names_fit_ifnamsiz() -> None:
    assert veth_name("lb-01") == "dflv-lb-01"
    long = veth_name("a-very-long-node-name-01")
    assert len(long) <= IFNAMSIZ and long.startswith("dflv-")
    assert long == veth_name("a-very-long-node-name-01")
    assert long != veth_name("a-very-long-node-name-02")


def test_real_lab_spec_maps_to_four_nodes() -> None:
    from infra.spec import load_spec

    lab = plan_from_spec(load_spec(PROJECT / "hosts" / "lab.yaml"))
    assert [(n.name, str(n.address)) for n in lab.nodes] == [
        ("lb-01", "10.77.0.10"),
        ("gpu-01", "10.77.0.11"),
        ("gpu-02", "10.77.0.12"),
        ("infra-01", "10.77.0.20"),
    ]
    assert lab.bridge == "dflab0" and lab.endpoint == "http://10.77.0.10:8000"


def test_nspawn_command_line_has_the_flags_this_kernel_needs() -> None:
    lab = plan()
    argv = nspawn_argv(lab, lab.nodes[0], LabPaths())
    for flag in (
        "--boot",
        "--register=no",
        "--keep-unit",
        "--timezone=off",
        "--machine=lb-01",
        "--network-namespace-path=/run/netns/dfl-lb-01",
        "--capability=CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON",
        "--system-call-filter=bpf add_key keyctl request_key",
        "--bind=/var/lib/deepfleet-lab/nodes/lb-01/docker:/var/lib/docker",
        "--bind-ro=/var/lib/deepfleet-lab/models:/data/models",
        "--directory=/var/lib/deepfleet-lab/nodes/lb-01/root",
    ):
        assert flag in argv
    assert NSPAWN_ENV == {
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",
    }


def test_network_commands_never_add_a_route() -> None:
    lab = plan()
    commands = bridge_commands(lab) + [c for n in lab.nodes for c in node_commands(lab, n)]
    assert not any("route" in argv for argv in commands)
    assert ["ip", "addr", "add", "10.77.0.1/24", "dev", "dflab0"] in commands
    assert ["ip", "-n", "dfl-gpu-02", "addr", "add", "10.77.0.12/24", "dev", "host0"] in commands


def test_firewall_drops_only_routed_traffic() -> None:
    rules = firewall_ruleset(plan())
    assert 'iifname "dflab0" oifname != "dflab0" drop' in rules
    assert 'oifname "dflab0" iifname != "dflab0" drop' in rules


def test_rootfs_cache_key_follows_the_package_list() -> None:
    base = RootfsRecipe()
    assert base.key == RootfsRecipe(packages=tuple(reversed(base.packages))).key
    assert base.key != RootfsRecipe(packages=(*base.packages, "jq")).key
    assert base.key != RootfsRecipe(suite="trixie").key
    argv = base.mmdebstrap_argv(Path("/tmp/x"))
    assert argv[:2] == ["mmdebstrap", "--variant=apt"] and argv[-2:] == ["bookworm", "/tmp/x"]
    assert "openssh-server" in argv[2] and "systemd-sysv" in argv[2]


def test_leftover_parsers() -> None:
    assert parse_netns("dfl-lb-01 (id: 0)\nother\ndfl-gpu-01\n") == ["dfl-lb-01", "dfl-gpu-01"]
    links = (
        "1: lo: <LOOPBACK,UP> mtu 65536\n"
        "5: dflab0: <BROADCAST,UP> mtu 1500\n"
        "6: dflv-lb-01@if2: <BROADCAST,UP> mtu 1500 master dflab0\n"
        "7: eth0: <BROADCAST,UP> mtu 1500\n"
    )
    assert parse_links(links, ["dflab0"]) == ["dflab0", "dflv-lb-01"]
    assert parse_links(links) == ["dflv-lb-01"]
    mounts = (
        "overlay /var/lib/deepfleet-lab/nodes/lb-01/root overlay rw 0 0\n"
        "/dev/vda /var/lib/deepfleet-lab/nodes/lb-01/root/var/lib/docker ext4 rw 0 0\n"
        "nsfs /run/netns/dfl-lb-01 nsfs rw 0 0\n"
        "nsfs /run/netns/someone-else nsfs rw 0 0\n"
        "/dev/vda /var/lib/deepfleet-lab/nodes/odd\\040name ext4 rw 0 0\n"
        "/dev/vda / ext4 rw 0 0\n"
    )
    assert parse_mounts(mounts, Path("/var/lib/deepfleet-lab/nodes")) == [
        "/var/lib/deepfleet-lab/nodes/lb-01/root/var/lib/docker",
        "/var/lib/deepfleet-lab/nodes/lb-01/root",
        "/var/lib/deepfleet-lab/nodes/odd name",
        "/run/netns/dfl-lb-01",
    ]


def test_classify_cmdline_recognises_only_lab_processes() -> None:
    nspawn = ["systemd-nspawn", "--boot", "--network-namespace-path=/run/netns/dfl-lb-01"]
    assert classify_cmdline(nspawn, "/x/conf") == "nspawn"
    other = ["/usr/bin/systemd-nspawn", "--network-namespace-path=/run/netns/theirs"]
    assert classify_cmdline(other, "/x/conf") is None
    assert classify_cmdline(["apt-cacher-ng", "-c", "/x/conf"], "/x/conf") == "acng"
    assert classify_cmdline(["/usr/sbin/apt-cacher-ng", "-c", "/etc/acng"], "/x/conf") is None
    assert classify_cmdline([], "/x/conf") is None


def test_state_round_trips_and_tolerates_corruption(tmp_path: Path) -> None:
    state = LabState(plan=plan(), spec="hosts/lab.yaml", pids={"lb-01": 42}, apt_cache_pid=7)
    path = tmp_path / "state.json"
    save_state(path, state)
    loaded = load_state(path)
    assert loaded is not None
    assert loaded.plan == state.plan and loaded.pids == {"lb-01": 42}
    assert loaded.apt_cache_pid == 7
    path.write_text("{truncated")
    assert load_state(path) is None
    assert load_state(tmp_path / "missing.json") is None


def test_host_apt_sources_skip_https_and_disabled_files(tmp_path: Path) -> None:
    listdir = tmp_path / "sources.list.d"
    listdir.mkdir()
    (listdir / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
    )
    (listdir / "vendor.list").write_text("deb https://example.com/apt stable main\n")
    (listdir / "old.list.disabled").write_text("deb http://example.com/apt stable main\n")
    (tmp_path / "sources.list").write_text("# nothing here\n")
    assert list(host_apt_sources(tmp_path)) == ["sources.list.d/debian.sources"]


def test_host_apt_sources_of_another_release_stay_on_the_host(tmp_path: Path) -> None:
    # An Ubuntu host: its sources would break the bookworm nodes (they keep mmdebstrap's).
    listdir = tmp_path / "sources.list.d"
    listdir.mkdir()
    (listdir / "ubuntu.sources").write_text(
        "Types: deb\nURIs: http://archive.ubuntu.com/ubuntu\nSuites: noble noble-updates\n"
    )
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://mirror.local/debian "
        "bookworm-security main\n"
    )
    assert list(host_apt_sources(tmp_path)) == ["sources.list"]
    assert source_suites("deb-src http://m/debian trixie main\n") == ["trixie"]


def test_ssh_command_uses_the_lab_key_and_no_known_hosts() -> None:
    argv = ssh_argv(plan(), LabPaths(), "gpu-02", ["uptime"])
    assert argv[:3] == ["ssh", "-i", ".lab/ssh/id_ed25519"]
    assert "StrictHostKeyChecking=no" in argv and "UserKnownHostsFile=/dev/null" in argv
    assert argv[-2:] == ["root@10.77.0.12", "uptime"]
    with pytest.raises(UserError, match="no lab node named 'gpu-09'"):
        ssh_argv(plan(), LabPaths(), "gpu-09", [])


def test_missing_tools_name_their_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda tool, path=None: None)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    messages = [p.message for p in lab_system.preflight_problems()]
    assert any("needs root" in m for m in messages)
    assert "`systemd-nspawn` is not installed (Debian package systemd-container)" in messages
    assert "`mmdebstrap` is not installed (Debian package mmdebstrap)" in messages


def test_lab_up_without_root_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(PROJECT)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["lab", "up"]) == 2
    assert "needs root" in capsys.readouterr().err
