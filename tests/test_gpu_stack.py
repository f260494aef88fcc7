"""GPU node stack: fact parsers on captured outputs, pure decisions, plans, and operation tests.

Operation tests are data files (tests/operations/<role>/<case>.json), run by
tests/test_operations.py; the tests here build on some of them (a second run converges, ...).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError
from pyinfra.api.exceptions import DeployError
from pyinfra.facts.deb import DebPackages

from facts.docker import parse_docker_info, problems, runtimes
from facts.nvidia import parse_kernel_module, parse_nvidia_smi, reboot_pending
from facts.rdma import (
    parse_gids,
    parse_ibstat,
    parse_ibv_devinfo,
    parse_rdma_link,
    port_problems,
)
from facts.roce_gid import Gid, gid_ipv4, nccl_gid_index
from infra.sglang import launches_for_node
from infra.spec import ClusterSpec, NvidiaStack, load_spec
from roles import container_runtime, mellanox, nvidia_driver
from tests.operations.harness import Case, MissingFact, load_cases, run_case, second_run

FIXTURES = Path(__file__).parent / "fixtures" / "gpu"
GPU_ROLES = {
    "nvidia_driver": nvidia_driver,
    "container_runtime": container_runtime,
    "mellanox": mellanox,
}
BAREMETAL = Path(__file__).parent.parent / "hosts" / "example-baremetal.yaml"
LAB = Path(__file__).parent.parent / "hosts" / "lab.yaml"


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text(encoding="utf-8").splitlines()


# --- operation tests: the data files run in tests/test_operations.py; cases built on them here ---


def _case(role: str, name: str) -> Case:
    (case,) = [c for c in load_cases(role) if c.path.stem == name]
    return case


@pytest.mark.parametrize(
    "name",
    [
        "fresh-node-holds-every-driver-stack-package-ubuntu-22.04",
        "fresh-hgx-ubuntu-24.04-reboot-allowed",
        "wrong-branch-pcie-ubuntu-24.04-reboot-allowed",
    ],
)
def test_first_run_converges(name: str) -> None:
    """One deploy is enough: a second run on what the first left runs no command."""
    case = _case("nvidia_driver", name)
    first = run_case(case, nvidia_driver)
    assert not first.failed, first.errors
    again = run_case(second_run(case, first), nvidia_driver)
    assert again.commands == {}
    assert not again.failed, again.errors


def test_first_run_holds_every_driver_stack_package() -> None:
    case = _case("nvidia_driver", "fresh-node-holds-every-driver-stack-package-ubuntu-22.04")
    first = run_case(case, nvidia_driver)
    ((hold,),) = [cmds for op, cmds in first.commands.items() if "] Hold " in op]
    installed = first.end_facts["deb.DebPackages"]
    stack = sorted(p for p in installed if nvidia_driver.package_branch(p) == 570)
    assert "libnvidia-compute-570-server" in stack and "nvidia-dkms-570-server" in stack
    assert hold == "apt-mark hold " + " ".join(stack)
    assert "dkms" not in hold.split()  # a dependency, not the driver stack


def test_converged_case_is_the_fresh_case_end_state() -> None:
    """The converged case shows what a first run leaves, not a hand-made ideal."""
    fresh = _case("nvidia_driver", "fresh-node-holds-every-driver-stack-package-ubuntu-22.04")
    converged = _case("nvidia_driver", "converged-hgx-ubuntu-22.04")
    end = run_case(fresh, nvidia_driver).end_facts
    for fact, value in converged.data["facts"].items():
        assert end[fact] == value, fact


def test_every_role_has_cases_for_both_ubuntu_releases() -> None:
    for role in GPU_ROLES:
        releases = {c.data.get("os") for c in load_cases(role)}
        assert {"ubuntu-22.04", "ubuntu-24.04"} <= releases, role


# --- nvidia facts ---------------------------------------------------------------------------------


def test_nvidia_smi_hgx_capture() -> None:
    state = parse_nvidia_smi(lines("nvidia-smi-h100x8.txt"))
    assert state["error"] is None
    assert len(state["gpus"]) == 8
    assert state["gpus"][7] == {
        "index": 7,
        "name": "NVIDIA H100 80GB HBM3",
        "driver_version": "570.172.08",
        "persistence_mode": True,
        "memory_total_mib": 81559,
        "ecc_uncorrected": 0,
    }


def test_nvidia_smi_na_fields_and_persistence_off() -> None:
    gpus = parse_nvidia_smi(lines("nvidia-smi-persistence-off.txt"))["gpus"]
    assert [g["persistence_mode"] for g in gpus] == [True, False, True, False]
    assert gpus[0]["ecc_uncorrected"] is None


@pytest.mark.parametrize(
    ("capture", "words"),
    [
        ("nvidia-smi-mismatch.txt", "Driver/library version mismatch"),
        ("nvidia-smi-no-driver.txt", "couldn't communicate with the NVIDIA driver"),
    ],
)
def test_nvidia_smi_failures_are_data(capture: str, words: str) -> None:
    state = parse_nvidia_smi(lines(capture))
    assert state["gpus"] == []
    assert state["error"] is not None and words in state["error"]


def test_kernel_module_pending_reboot() -> None:
    module = parse_kernel_module(lines("kernel-module-pending.txt"))
    assert module == {"loaded": "550.127.05", "installed": "570.172.08"}
    assert reboot_pending(module)
    assert not reboot_pending({"loaded": "570.172.08", "installed": "570.172.08"})
    assert not reboot_pending({"loaded": None, "installed": None})


# --- docker facts ---------------------------------------------------------------------------------


def test_docker_info_gpu_node() -> None:
    info = parse_docker_info(lines("docker-info-gpu.json"))
    assert info is not None
    assert runtimes(info) == ["io.containerd.runc.v2", "nvidia", "runc"]
    assert problems(info, want_nvidia=True, data_root="/var/lib/docker") == []


def test_docker_info_without_nvidia_runtime() -> None:
    info = parse_docker_info(lines("docker-info-no-nvidia.json"))
    assert problems(info, want_nvidia=False, data_root="/var/lib/docker") == []
    (problem,) = problems(info, want_nvidia=True, data_root="/var/lib/docker")
    assert "'nvidia' runtime is not registered" in problem
    assert "data-root is /var/lib/docker" in problems(info, want_nvidia=False, data_root="/data")[0]


def test_docker_info_daemon_down() -> None:
    assert parse_docker_info(lines("docker-info-daemon-down.json")) is None
    assert parse_docker_info([]) is None
    assert "does not answer" in problems(None, want_nvidia=False, data_root="/var/lib/docker")[0]


# --- rdma facts -----------------------------------------------------------------------------------


def test_ibstat_capture() -> None:
    cas = parse_ibstat(lines("ibstat-hgx.txt"))
    assert sorted(cas) == ["mlx5_0", "mlx5_1"]
    assert cas["mlx5_0"]["firmware"] == "28.39.1002"
    assert cas["mlx5_1"]["ports"][1] == {
        "state": "Active",
        "physical_state": "LinkUp",
        "rate_gbps": 200.0,
        "link_layer": "Ethernet",
    }


def test_ibv_devinfo_and_rdma_link_captures() -> None:
    devices = parse_ibv_devinfo(lines("ibv_devinfo-hgx.txt"))
    assert devices["mlx5_0"][1] == {
        "state": "PORT_ACTIVE",
        "active_mtu": 4096,
        "link_layer": "Ethernet",
    }
    assert devices["mlx5_1"][1]["state"] == "PORT_DOWN"
    links = parse_rdma_link(lines("rdma-link-hgx.txt"))
    assert links[1] == {
        "device": "mlx5_1",
        "port": 1,
        "state": "DOWN",
        "physical_state": "POLLING",
        "netdev": "ens1f1np1",
    }


def test_port_problems_name_node_device_and_port() -> None:
    spec = load_spec(BAREMETAL)
    wanted = mellanox.wanted_ports(spec.node("gpu-01"))
    assert port_problems("gpu-01", wanted, parse_ibstat(lines("ibstat-hgx.txt"))) == []
    slow, down = port_problems("gpu-01", wanted, parse_ibstat(lines("ibstat-degraded.txt")))
    assert slow.startswith("gpu-01 mlx5_0 port 1: runs at 100 Gb/s, the spec wants 200 Gb/s")
    assert down.startswith("gpu-01 mlx5_1 port 1: down (state Down, physical state Polling)")
    (missing, wrong_layer) = port_problems(
        "gpu-01", wanted, parse_ibstat(lines("ibstat-infiniband.txt"))
    )
    assert "link layer is InfiniBand, the spec wants ethernet" in missing
    assert wrong_layer.startswith("gpu-01 mlx5_1 port 1: device not found (ibstat lists: mlx5_0)")


def test_roce_gid_index_for_nccl() -> None:
    gids = parse_gids(lines("gids-hgx.txt"))
    assert nccl_gid_index(gids, "mlx5_0") == 3
    assert str(gid_ipv4(gids[3]["gid"])) == "198.51.100.11"
    two = parse_gids(lines("gids-two-vlans.txt"))
    assert nccl_gid_index(two, "mlx5_0") == 3
    assert nccl_gid_index(two, "mlx5_0", netdev="bond1.12") == 5
    assert nccl_gid_index(parse_gids(lines("gids-no-address.txt")), "mlx5_0") is None


def test_roce_problems_are_what_would_stop_the_engines() -> None:
    spec = load_spec(BAREMETAL)
    node = spec.node("gpu-01")
    assert mellanox.roce_problems(node, parse_gids(lines("gids-hgx.txt"))) == []
    missing = mellanox.roce_problems(node, parse_gids(lines("gids-no-address.txt")))
    assert missing == [
        f"gpu-01 {device} port 1: no RoCE v2 GID with an IPv4 address on bond1.12 (is the "
        f"address up? check with `show_gids {device}`)"
        for device in ("mlx5_0", "mlx5_1")
    ]
    mixed = parse_gids(lines("gids-two-vlans.txt")) + [
        g for g in parse_gids(lines("gids-hgx.txt")) if g["device"] == "mlx5_1"
    ]  # mlx5_0's address on bond1.12 is at 5, mlx5_1's at 3
    (disagree,) = mellanox.roce_problems(node, mixed)
    assert disagree.startswith(
        "gpu-01 RoCE ports disagree on the GID index (mlx5_0 port 1: 5, mlx5_1 port 1: 3)"
    )
    assert mellanox.roce_problems(spec.node("gpu-03"), []) == []  # no RoCE ports


def _with_env(spec: ClusterSpec, deployment: str, env: dict[str, str]) -> ClusterSpec:
    raw = spec.model_dump(mode="json")
    for entry in raw["deployments"]:
        if entry["name"] == deployment:
            entry["env"] = env
    return ClusterSpec.model_validate(raw)


def test_a_pinned_gid_index_must_be_where_the_table_has_it() -> None:
    spec = load_spec(BAREMETAL)
    two_vlans = parse_gids(lines("gids-two-vlans.txt"))
    both_at_5 = two_vlans + [Gid(**{**g, "device": "mlx5_1"}) for g in two_vlans]
    # Nothing pinned: the engines read the index at start, whatever it is.
    assert mellanox.gid_index_problems(spec, spec.node("gpu-01"), both_at_5) == []
    pinned = _with_env(spec, "r1", {"NCCL_IB_GID_INDEX": "3"})
    (problem,) = mellanox.gid_index_problems(pinned, pinned.node("gpu-01"), both_at_5)
    assert problem.startswith(
        "gpu-01: the RoCE v2 IPv4 GID of mlx5_0 port 1, mlx5_1 port 1 is at index 5, but "
        "deployment r1 pins NCCL_IB_GID_INDEX=3"
    )
    assert "remove NCCL_IB_GID_INDEX from deployments[r1].env" in problem
    assert 'or set it to "5"' in problem
    fixed = _with_env(spec, "r1", {"NCCL_IB_GID_INDEX": "5"})
    assert mellanox.gid_index_problems(fixed, fixed.node("gpu-01"), both_at_5) == []
    # No good index at all is roce_problems' to report, not this check's.
    no_address = parse_gids(lines("gids-no-address.txt"))
    assert mellanox.gid_index_problems(pinned, pinned.node("gpu-01"), no_address) == []


@pytest.mark.parametrize("env", [{}, {"NCCL_IB_GID_INDEX": "5"}])
def test_engines_read_the_gid_index_at_start_unless_the_spec_pins_it(env: dict[str, str]) -> None:
    """What mellanox checks is what infra/sglang.py gives the engines: the probe, or the pin."""
    spec = _with_env(load_spec(BAREMETAL), "r1", env)
    for name in ("gpu-01", "gpu-02"):
        assert mellanox.engine_gid_overrides(spec, spec.node(name)) == ({"r1": "5"} if env else {})
        for launch in launches_for_node(spec, name):
            args = launch.container_args
            assert launch.env.get("NCCL_IB_GID_INDEX") == env.get("NCCL_IB_GID_INDEX")
            if env:
                assert launch.nccl_env_command == [] and launch.nccl_env_file is None
            else:
                assert launch.nccl_env_command[-2:] == ["mlx5_0:1:bond1.12", "mlx5_1:1:bond1.12"]
                out = launch.nccl_env_command[launch.nccl_env_command.index("--out") + 1]
                assert out == launch.nccl_env_file
                assert ("--env-file", out) in itertools.pairwise(args)


# --- nvidia_driver decisions ------------------------------------------------------------------------


def test_debian_is_refused_with_the_reason_and_the_way_out() -> None:
    debian = {
        "name": "Debian",
        "major": 12,
        "minor": None,
        "release_meta": {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"},
    }
    with pytest.raises(DeployError) as refused:
        nvidia_driver.require_ubuntu("gpu-01", "nvidia_driver", debian)
    message = str(refused.value)
    assert message.startswith(
        "gpu-01: the nvidia_driver role supports Ubuntu 22.04 and 24.04 only; this node runs "
        "Debian GNU/Linux 12 (bookworm)."
    )
    assert "without a branch" in message and "Reinstall the node with Ubuntu" in message
    assert "docs/gpu-stack.md" in message
    nvidia_driver.require_ubuntu(
        "gpu-01", "nvidia_driver", {"name": "Ubuntu", "major": 24, "minor": 4}
    )


def test_stale_packages_only_when_they_differ() -> None:
    converged = ["nvidia-driver-570-server", "libnvidia-compute-570-server", "cuda-toolkit-12-8"]
    assert nvidia_driver.stale_packages(converged, 570) == []
    old = [
        "nvidia-driver-535-server",
        "libnvidia-compute-535-server",
        "linux-modules-nvidia-535-server-6.8.0-1009-nvidia",
        "nvidia-container-toolkit",
        "libnvidia-container1",
        "cuda-toolkit-12-2",
        "openssh-server",
    ]
    assert nvidia_driver.stale_packages(old, 570) == [
        "cuda-toolkit-12-2",
        "libnvidia-compute-535-server",
        "linux-modules-nvidia-535-server-6.8.0-1009-nvidia",
        "nvidia-driver-535-server",
    ]
    # CUDA's driver metapackages follow the newest branch: always out.
    assert nvidia_driver.stale_packages(["cuda-drivers-570", "cuda"], 570) == [
        "cuda",
        "cuda-drivers-570",
    ]


def test_package_names_and_fabric_manager_version() -> None:
    stack = NvidiaStack(driver_version="570.172.08-0ubuntu1", open_kernel_modules=True)
    node = load_spec(BAREMETAL).node("gpu-01")
    assert nvidia_driver.wanted_packages(stack, node) == [
        "nvidia-driver-570-server-open=570.172.08-0ubuntu1",
        "nvidia-fabricmanager-570=570.172.08-1",
    ]
    pcie = load_spec(BAREMETAL).node("gpu-03")
    assert nvidia_driver.wanted_packages(NvidiaStack(driver_flavour="desktop"), pcie) == [
        "nvidia-driver-570"
    ]


def test_spec_rejects_fabric_manager_of_another_version() -> None:
    with pytest.raises(ValidationError, match="fabric manager must run exactly the driver"):
        NvidiaStack(driver_version="570.172.08-0ubuntu1", fabricmanager_version="570.133.20-1")


def test_gpu_problems() -> None:
    spec = load_spec(BAREMETAL)
    node, stack = spec.node("gpu-01"), spec.nvidia
    ok = parse_nvidia_smi(lines("nvidia-smi-h100x8.txt"))
    assert nvidia_driver.gpu_problems(node, stack, ok, "active") == []
    short = parse_nvidia_smi(lines("nvidia-smi-h100x7.txt"))
    assert nvidia_driver.gpu_problems(node, stack, short, "failed") == [
        "gpu-01: nvidia-smi sees 7 GPUs, the spec says 8x H100 (reseat or check `dmesg | grep NVRM`)",
        "gpu-01: nvidia-fabricmanager is failed (NVSwitch boards need it active with exactly the "
        "driver's version: `journalctl -u nvidia-fabricmanager`)",
    ]
    pinned = NvidiaStack(driver_version="570.195.03-0ubuntu1")
    assert nvidia_driver.gpu_problems(node, pinned, ok, "active") == [
        "gpu-01: driver 570.172.08 runs, the spec wants 570.195.03"
    ]
    wrong_model = nvidia_driver.gpu_problems(
        spec.node("gpu-03"), stack, ok, None
    )  # H100s where the spec says L40S
    assert "gpu-03: GPUs are NVIDIA H100 80GB HBM3, the spec says L40S" in wrong_model
    mismatch = parse_nvidia_smi(lines("nvidia-smi-mismatch.txt"))
    assert nvidia_driver.gpu_problems(node, stack, mismatch, "active")[0].startswith(
        "gpu-01: nvidia-smi failed: Failed to initialize NVML: Driver/library version mismatch"
    )


# --- plans ----------------------------------------------------------------------------------------


def test_plans_concern_the_right_nodes() -> None:
    spec = load_spec(BAREMETAL)
    applies = {
        role: sorted(n.name for n in spec.nodes if module.plan(spec, n) is not None)
        for role, module in GPU_ROLES.items()
    }
    assert applies == {
        "nvidia_driver": ["gpu-01", "gpu-02", "gpu-03"],
        "container_runtime": ["gpu-01", "gpu-02", "gpu-03", "storage-01"],
        "mellanox": ["gpu-01", "gpu-02"],
    }


def test_lab_plans_skip_but_describe_production() -> None:
    spec = load_spec(LAB)
    node = spec.node("gpu-01")
    driver = nvidia_driver.plan(spec, node)
    assert driver is not None and driver.skipped == "lab: no GPUs / no vendor repositories"
    assert any("install nvidia-driver-570-server" in line for line in driver.summary)
    rdma = mellanox.plan(spec, node)
    assert rdma is not None and rdma.skipped
    runtime = container_runtime.plan(spec, node)
    assert runtime is not None and runtime.skipped is None
    assert runtime.summary[0].startswith("LAB: Debian's docker.io")
    assert any("docker-ce" in line for line in runtime.summary)  # production still shown
    assert runtime.packages == ["docker.io"]
    assert mellanox.plan(spec, spec.node("lb-01")) is None


def test_daemon_json_as_nvidia_ctk_writes_it() -> None:
    spec = load_spec(BAREMETAL)
    rendered = json.loads(container_runtime.daemon_json(spec, spec.node("gpu-01")))
    assert rendered == {
        "data-root": "/var/lib/docker",
        "log-driver": "json-file",
        "log-opts": {"max-file": "5", "max-size": "100m"},
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
    }
    assert "runtimes" not in json.loads(
        container_runtime.daemon_json(spec, spec.node("storage-01"))
    )


@pytest.mark.validators
def test_apt_reads_the_unattended_upgrades_blacklist(tmp_path: Path) -> None:
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        pytest.skip("apt-config not installed (Debian package apt)")
    (blacklist,) = [f for f in nvidia_driver.planned_files() if "unattended" in f.path]
    conf = tmp_path / "51deepfleet"
    conf.write_text(blacklist.content)
    dump = subprocess.run(
        [apt_config, "-c", str(conf), "dump"], capture_output=True, text=True, check=True
    ).stdout
    listed = [
        line.split('"')[1]
        for line in dump.splitlines()
        if line.startswith("Unattended-Upgrade::Package-Blacklist:: ")
    ]
    assert listed == list(nvidia_driver.UNATTENDED_PATTERNS)


def test_harness_names_a_missing_fact(tmp_path: Path) -> None:
    case = Case(
        tmp_path / "nvidia_driver" / "incomplete.json",
        {"spec": "hosts/example-baremetal.yaml", "node": "gpu-03", "facts": {}, "commands": {}},
    )
    with pytest.raises(
        MissingFact, match=r"incomplete: no value for fact server\.LinuxDistribution\(\)"
    ):
        run_case(case, nvidia_driver)


def test_real_h100_capture() -> None:
    """nvidia-smi and the module fact, run unchanged on an H100 machine (see fixtures README)."""
    state = parse_nvidia_smi(lines("nvidia-smi-h100-device.txt"))
    assert state == {
        "gpus": [
            {
                "index": 0,
                "name": "NVIDIA H100 80GB HBM3",
                "driver_version": "580.159.04",
                "persistence_mode": True,
                "memory_total_mib": 81559,
                "ecc_uncorrected": 0,
            }
        ],
        "error": None,
    }
    module = parse_kernel_module(lines("kernel-module-container.txt"))
    assert module == {"loaded": "580.159.04", "installed": None}
    assert not reboot_pending(module)  # nothing on disk to load: no reboot to ask for


def test_real_cuda_container_packages_are_not_stale() -> None:
    installed = DebPackages().process(lines("dpkg-cuda-container.txt"))  # type: ignore[no-untyped-call]
    assert "cuda-compat-13-0" in installed
    # No driver packages of another branch: the host CUDA packages stay.
    assert nvidia_driver.stale_packages(installed, 580) == []
    assert nvidia_driver.stale_packages(installed, 570) == []
