"""base role: rendered files for the example specs, and the programs that read them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.render import HostFile, RolePlan
from infra.spec import ClusterSpec, load_spec
from roles import base
from tests.conftest import EXAMPLE_SPECS, HOSTS

BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
AWS = load_spec(HOSTS / "example-aws.yaml")
LAB = load_spec(HOSTS / "lab.yaml")


def _spec(path: Path, **site: Any) -> ClusterSpec:
    data = yaml.safe_load(path.read_text())
    data["site"].update(site)
    return ClusterSpec.model_validate(data)


def _file(plan: RolePlan, path: str) -> str:
    return next(f.content for f in plan.files if f.path == path)


def _paths(plan: RolePlan) -> set[str]:
    return {f.path for f in plan.files}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


# --- /etc/hosts ------------------------------------------------------------------------------


def test_hosts_lists_every_node_by_management_address() -> None:
    hosts = _file(base.plan(BAREMETAL, BAREMETAL.node("gpu-01")), base.HOSTS_PATH)
    assert _lines(hosts) == [
        "127.0.0.1\tlocalhost",
        "192.0.2.11\tgpu-01.dc1.example.com gpu-01",
        "192.0.2.12\tgpu-02.dc1.example.com gpu-02",
        "192.0.2.13\tgpu-03.dc1.example.com gpu-03",
        "192.0.2.20\tlb-01.dc1.example.com lb-01",
        "192.0.2.1\tnat-01.dc1.example.com nat-01",
        "192.0.2.30\tstorage-01.dc1.example.com storage-01",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
    ]


def test_a_listed_node_never_resolves_to_loopback() -> None:
    # Gloo/NCCL bind to what the hostname resolves to: 127.0.1.1 breaks multi-node serving.
    for spec in (BAREMETAL, LAB):
        for node in spec.nodes:
            assert "127.0.1.1" not in _file(base.plan(spec, node), base.HOSTS_PATH)


def test_cloud_nodes_without_known_addresses_name_only_themselves() -> None:
    hosts = _file(base.plan(AWS, AWS.node("gpu-01")), base.HOSTS_PATH)
    assert "127.0.1.1\tgpu-01" in hosts.splitlines()
    assert "lb-01" not in hosts


def test_lab_hosts_use_the_search_domain() -> None:
    hosts = _file(base.plan(LAB, LAB.node("gpu-02")), base.HOSTS_PATH)
    assert "10.77.0.20\tinfra-01.lab.internal infra-01" in hosts.splitlines()


# --- apt ---------------------------------------------------------------------------------------


def test_mirror_and_proxy_only_when_set() -> None:
    metal = _paths(base.plan(BAREMETAL, BAREMETAL.node("gpu-01")))
    assert base.APT_SOURCES_PATH in metal and base.APT_PROXY_PATH not in metal
    lab = _paths(base.plan(LAB, LAB.node("gpu-01")))
    assert base.APT_PROXY_PATH in lab and base.APT_SOURCES_PATH not in lab
    aws = _paths(base.plan(AWS, AWS.node("gpu-01")))
    assert base.APT_PROXY_PATH not in aws and base.APT_SOURCES_PATH not in aws


def test_mirror_sources() -> None:
    sources = _file(base.plan(BAREMETAL, BAREMETAL.node("gpu-01")), base.APT_SOURCES_PATH)
    assert _lines(sources) == [
        "Types: deb",
        "URIs: http://mirror.dc1.example.com/ubuntu",
        "Suites: noble noble-updates noble-backports noble-security",
        "Components: main restricted universe multiverse",
        "Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg",
    ]


def test_proxy() -> None:
    proxy = _file(base.plan(LAB, LAB.node("gpu-01")), base.APT_PROXY_PATH)
    assert 'Acquire::http::Proxy "http://10.77.0.1:3142";' in proxy.splitlines()


def test_unattended_upgrades_leave_the_gpu_stack_and_kernel_alone() -> None:
    text = _file(base.plan(BAREMETAL, BAREMETAL.node("gpu-01")), base.UNATTENDED_PATH)
    for pattern in ("nvidia-", "libnvidia-", "cuda-", "linux-"):
        assert f'    "{pattern}";' in text.splitlines()


def _apt_config_dump(host_file: HostFile, tmp_path: Path) -> str:
    conf = tmp_path / Path(host_file.path).name
    conf.write_text(host_file.content)
    result = subprocess.run(
        ["apt-config", "-c", str(conf), "dump"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    return result.stdout


needs_apt = pytest.mark.skipif(shutil.which("apt-config") is None, reason="needs apt (Debian)")


@pytest.mark.validators
@needs_apt
def test_apt_reads_the_conf_snippets(tmp_path: Path) -> None:
    lab = base.plan(LAB, LAB.node("gpu-01"))
    for path in (base.APT_PROXY_PATH, base.UNATTENDED_PATH):
        dump = _apt_config_dump(next(f for f in lab.files if f.path == path), tmp_path)
        if path == base.APT_PROXY_PATH:
            assert 'Acquire::http::Proxy "http://10.77.0.1:3142";' in dump
        else:
            assert 'Unattended-Upgrade::Package-Blacklist:: "nvidia-";' in dump
            assert 'Unattended-Upgrade::Package-Blacklist:: "linux-";' in dump


@pytest.mark.validators
@needs_apt
def test_apt_rejects_a_broken_conf_snippet(tmp_path: Path) -> None:
    conf = tmp_path / "broken"
    conf.write_text('Acquire::http::Proxy "http://10.77.0.1:3142"\n')  # no semicolon
    result = subprocess.run(["apt-config", "-c", str(conf), "dump"], capture_output=True)
    assert result.returncode != 0 and b"Syntax error" in result.stderr


def _apt_print_uris(sources: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`apt-get --print-uris update` reads the sources and prints what it would fetch, offline."""
    parts, lists = tmp_path / "sources.list.d", tmp_path / "lists"
    parts.mkdir(exist_ok=True)
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (parts / "ubuntu.sources").write_text(sources)
    return subprocess.run(
        [
            "apt-get",
            "-o",
            "Dir::Etc::SourceList=/dev/null",
            "-o",
            f"Dir::Etc::SourceParts={parts}",
            "-o",
            f"Dir::State::Lists={lists}",
            "--print-uris",
            "update",
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.validators
@needs_apt
def test_apt_reads_the_mirror_sources(tmp_path: Path) -> None:
    sources = _file(base.plan(BAREMETAL, BAREMETAL.node("gpu-01")), base.APT_SOURCES_PATH)
    result = _apt_print_uris(sources, tmp_path)
    assert result.returncode == 0, result.stderr
    for suite in ("noble", "noble-updates", "noble-backports", "noble-security"):
        assert f"'http://mirror.dc1.example.com/ubuntu/dists/{suite}/InRelease'" in result.stdout


@pytest.mark.validators
@needs_apt
def test_apt_rejects_broken_sources(tmp_path: Path) -> None:
    result = _apt_print_uris("Types: deb\nURIs http://x/ubuntu\nSuites: noble\n", tmp_path)
    assert result.returncode != 0 and "Malformed entry" in result.stderr


# --- sysctl and limits -------------------------------------------------------------------------


def _sysctl_settings(text: str) -> dict[str, str]:
    settings = {}
    for line in _lines(text):
        key, sep, value = line.partition(" = ")
        assert sep, f"not a `key = value` line: {line!r}"
        settings[key] = value
    return settings


def test_sysctl_file_holds_every_setting_on_every_node() -> None:
    for spec in (BAREMETAL, LAB):
        text = _file(base.plan(spec, spec.nodes[0]), base.SYSCTL_PATH)
        assert _sysctl_settings(text) == {s.key: s.value for s in base.SYSCTLS}
    text = _file(base.plan(BAREMETAL, BAREMETAL.nodes[0]), base.SYSCTL_PATH)
    assert "net.core.rmem_max = 268435456" in text.splitlines()
    assert "vm.max_map_count = 1048576" in text.splitlines()
    assert "kernel.numa_balancing = 0" in text.splitlines()


def test_lab_applies_only_the_settings_a_container_can_set() -> None:
    assert {s.key for s in base.applied_sysctls(BAREMETAL)} == {s.key for s in base.SYSCTLS}
    lab = {s.key for s in base.applied_sysctls(LAB)}
    assert lab == {
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.core.somaxconn",
        "net.ipv4.tcp_mtu_probing",
        "net.ipv4.tcp_slow_start_after_idle",
    }
    # The lab's summary says what it leaves out.
    assert any("lab: only the 5" in line for line in base.plan(LAB, LAB.nodes[0]).summary)


def _unknown_sysctl_keys(text: str) -> list[str]:
    """The kernel is the validator: every key must exist under /proc/sys."""
    return [
        key
        for key in _sysctl_settings(text)
        if not (Path("/proc/sys") / key.replace(".", "/")).exists()
    ]


@pytest.mark.validators
def test_every_sysctl_key_exists_in_the_kernel() -> None:
    text = _file(base.plan(BAREMETAL, BAREMETAL.nodes[0]), base.SYSCTL_PATH)
    assert _unknown_sysctl_keys(text) == []


@pytest.mark.validators
def test_a_misspelt_sysctl_key_is_caught() -> None:
    assert _unknown_sysctl_keys("vm.max_mapcount = 1048576\n") == ["vm.max_mapcount"]


@pytest.mark.validators
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_per_netns_settings_are_settable_in_a_private_network_namespace() -> None:
    # What the lab relies on: these apply inside a container with its own network namespace.
    for setting in base.applied_sysctls(LAB):
        result = subprocess.run(
            ["unshare", "-n", "sysctl", "-w", f"{setting.key}={setting.value}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 and "Operation not permitted" in result.stderr:
            pytest.skip("unshare -n needs root")
        assert result.returncode == 0, result.stderr


LIMIT_TYPES = {"soft", "hard", "-"}
LIMIT_ITEMS = {"memlock", "nofile", "nproc", "stack", "core"}


def _limits_problems(text: str) -> list[str]:
    """limits.conf(5): `<domain> <type> <item> <value>` with known types and items."""
    problems = []
    for line in _lines(text):
        fields = line.split()
        if len(fields) != 4:
            problems.append(f"not 4 fields: {line!r}")
        elif fields[1] not in LIMIT_TYPES or fields[2] not in LIMIT_ITEMS:
            problems.append(f"unknown type or item: {line!r}")
        elif fields[3] != "unlimited" and not fields[3].isdigit():
            problems.append(f"bad value: {line!r}")
    return problems


def test_limits_memlock_unlimited_and_nofile_for_everyone_and_root() -> None:
    text = _file(base.plan(BAREMETAL, BAREMETAL.node("gpu-01")), base.LIMITS_PATH)
    assert _limits_problems(text) == []
    rows = {tuple(line.split()[:3]): line.split()[3] for line in _lines(text)}
    for domain in ("*", "root"):
        for kind in ("soft", "hard"):
            assert rows[(domain, kind, "memlock")] == "unlimited"
            assert rows[(domain, kind, "nofile")] == "1048576"


def test_a_broken_limits_line_is_caught() -> None:
    assert _limits_problems("* soft memlok unlimited\n") != []


# --- cloud-init ----------------------------------------------------------------------------


def test_cloud_init_network_disabled_only_when_asked() -> None:
    text = _file(base.plan(BAREMETAL, BAREMETAL.node("gpu-01")), base.CLOUD_INIT_PATH)
    assert yaml.safe_load(text) == {"network": {"config": "disabled"}}
    keep = _spec(HOSTS / "example-baremetal.yaml", disable_cloud_init_network=False)
    assert base.CLOUD_INIT_PATH not in _paths(base.plan(keep, keep.node("gpu-01")))


# --- whole plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_every_node_gets_base(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for node in spec.nodes:
        plan = base.plan(spec, node)
        assert plan.role == "base" and plan.skipped is None
        assert plan.packages == list(base.BASE_PACKAGES)
        assert {base.HOSTS_PATH, base.SYSCTL_PATH, base.LIMITS_PATH} <= _paths(plan)
        assert f"time zone {spec.site.timezone}" in plan.summary
        for host_file in plan.files:
            assert host_file.content.startswith(("#", "//")), host_file.path
            assert "Managed by deepfleet" in host_file.content


# --- operations: a pyinfra dry run of the three OS roles -----------------------------------

DRY_DEPLOY = """\
import os

from pyinfra.facts import systemd

# This build machine's PID 1 is not systemd: answer "no units" instead of failing the fact.
systemd.SystemdStatus.command = lambda self, *args, **kwargs: "true"
systemd.SystemdEnabled.command = lambda self, *args, **kwargs: "true"

from infra.spec import load_spec
from roles import base, model_storage, timesync

spec = load_spec(os.environ["DRY_SPEC"])
node = spec.node(os.environ["DRY_NODE"])
for role in (base, timesync, model_storage):
    if role.plan(spec, node) is not None:
        role.apply(spec=spec, node=node)
"""
# Operations that only follow a change (gated with `_if=`): never a change on their own.
FOLLOW_UPS = ("Refresh apt lists", "Reload systemd", "Restart ", "Re-export", "Start deepfleet")
# Verification steps read facts when the deploy runs and change nothing.
CHECKS = ("Verify ", "Check ", "Report ")


def dry_run(spec_path: Path, node: str, tmp_path: Path) -> list[dict[str, Any]]:
    """`pyinfra @local deploy --dry --json` for one node: the operations, in order."""
    deploy = tmp_path / "dry_deploy.py"
    deploy.write_text(DRY_DEPLOY)
    project = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [str(project / ".venv/bin/pyinfra"), "@local", str(deploy), "--dry", "--json"],
        capture_output=True,
        text=True,
        check=False,
        cwd=project,
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(project),
            "DRY_SPEC": str(spec_path),
            "DRY_NODE": node,
        },
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan: list[dict[str, Any]] = json.loads(result.stdout)["plan"]
    return plan


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec_name", "node", "expected"),
    [
        (
            "lab",
            "gpu-01",
            [
                "[base] Set hostname gpu-01",
                "[base] Set time zone Asia/Shanghai",
                "[base] Write /etc/hosts",
                "[base] Write /etc/apt/apt.conf.d/90deepfleet-proxy",
                "[base] Write /etc/apt/apt.conf.d/51deepfleet-unattended-upgrades",
                "[base] Refresh apt lists from the new sources",
                "[base] Install base packages",
                "[base] Write /etc/sysctl.d/90-deepfleet.conf",
                "[base] Set net.ipv4.tcp_rmem to 4096 87380 268435456",
                "[base] Set net.ipv4.tcp_wmem to 4096 65536 268435456",
                "[base] Set net.core.somaxconn to 4096",
                "[base] Set net.ipv4.tcp_mtu_probing to 1",
                "[base] Set net.ipv4.tcp_slow_start_after_idle to 0",
                "[base] Write /etc/security/limits.d/90-deepfleet.conf",
                "[base] Write /etc/cloud/cloud.cfg.d/99-disable-network-config.cfg",
                "[timesync] Install chrony",
                "[timesync] Remove systemd-timesyncd",
                "[timesync] Write /etc/chrony/chrony.conf",
                "[timesync] Write /etc/systemd/system/chrony.service.d/10-deepfleet-lab.conf",
                "[timesync] Reload systemd after the chrony drop-in changed",
                "[timesync] Start and enable chrony",
                "[timesync] Restart chrony after its configuration changed",
                "[timesync] Verify chrony is synchronised",
                "[model_storage] Check the lab's read-only model mount /data/models",
                "[model_storage] Report the model directories under /data/models",
            ],
        ),
        (
            "example-baremetal",
            "storage-01",
            [
                "[model_storage] Install the NFS server",
                "[model_storage] Create the export /srv/models",
                "[model_storage] Create the model directory /srv/models/deepseek-r1",
                "[model_storage] Create the model directory "
                "/srv/models/deepseek-r1-distill-qwen-32b",
                "[model_storage] Write /etc/exports.d/deepfleet.exports",
                "[model_storage] Start and enable the NFS server",
                "[model_storage] Re-export after the exports changed",
            ],
        ),
        (
            "example-baremetal",
            "gpu-01",
            [
                "[model_storage] Install the nfs client",
                "[model_storage] Write /etc/systemd/system/data-models.mount",
                "[model_storage] Reload systemd after data-models.mount changed",
                "[model_storage] Mount /data/models and mount it at boot",
                "[model_storage] Report the model directories under /data/models",
            ],
        ),
    ],
)
def test_operations_are_named_gated_and_read_only_checks(
    spec_name: str, node: str, expected: list[str], tmp_path: Path
) -> None:
    operations = dry_run(HOSTS / f"{spec_name}.yaml", node, tmp_path)
    names = []
    for operation in operations:
        role, _, name = operation["name"].partition(" | ")
        assert name.startswith(f"[{role}] "), operation["name"]
        action = name.split("] ", 1)[1]
        if action.startswith("Update apt lists to install "):
            # Depends on what this machine has installed (roles/_apt.py). Where the apt
            # sources change in the same run, their refresh stands in for it: conditional.
            changes = operation["hosts_with_change"] + operation["hosts_with_conditional_change"]
            assert changes == ["@local"], name
            continue
        names.append(name)
        if action.startswith(FOLLOW_UPS):
            assert operation["hosts_with_change"] == [], f"{name} runs without a change"
            assert operation["hosts_with_conditional_change"] == ["@local"], name
        if action.startswith(CHECKS):
            assert operation["hosts_with_change"] == [], f"{name} would change the host"
    if spec_name == "lab":
        assert names == expected
    else:
        # Production: the model_storage part; base/timesync are as in the lab plus the rest.
        assert [n for n in names if n.startswith("[model_storage]")] == expected
        assert "[timesync] Verify chrony is synchronised" in names
        assert "[base] Set vm.max_map_count to 1048576" in names
