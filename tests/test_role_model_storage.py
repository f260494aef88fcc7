"""model_storage role: NFS export, mount units, the lab's bind mount, and the checked cache."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from facts.storage import ModelCache, MountPoint
from infra.render import HostFile, RolePlan
from infra.spec import ClusterSpec, load_spec
from infra.validators import ConfigRejected, check_apt_source, check_systemd_units
from roles import model_storage
from tests.conftest import EXAMPLE_SPECS, HOSTS
from tests.operations.harness import Case, case_spec, load_cases, run_case, second_run
from tests.test_role_timesync import systemd_verify

BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
AWS = load_spec(HOSTS / "example-aws.yaml")
LAB = load_spec(HOSTS / "lab.yaml")
FIXTURES = Path(__file__).parent / "fixtures" / "facts"
MOUNT_UNIT = "/etc/systemd/system/data-models.mount"


def _spec(path: Path, **storage: Any) -> ClusterSpec:
    data = yaml.safe_load(path.read_text())
    data["storage"][0].update(storage)
    return ClusterSpec.model_validate(data)


def _plan(spec: ClusterSpec, node: str) -> RolePlan:
    plan = model_storage.plan(spec, spec.node(node))
    assert plan is not None
    return plan


def _file(plan: RolePlan, path: str) -> str:
    return next(f.content for f in plan.files if f.path == path)


def _directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


# --- unit names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/data/models", "/", "/srv/my-models/a.b", "/.hidden/x y", "//data//models/", "/mnt/ü"],
)
def test_unit_names_follow_systemd_escape(path: str) -> None:
    tool = shutil.which("systemd-escape")
    if tool is None:
        pytest.skip("needs systemd-escape")
    expected = subprocess.run(
        [tool, "--path", "--suffix=mount", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert model_storage.mount_unit_name(path) == expected


def test_known_unit_names() -> None:
    assert model_storage.mount_unit_name("/data/models") == "data-models.mount"
    assert model_storage.mount_unit_name("/srv/deep-seek") == "srv-deep\\x2dseek.mount"


# --- NFS (bare metal) ----------------------------------------------------------------------


def test_nfs_server_exports_read_only_to_the_storage_network_only() -> None:
    plan = _plan(BAREMETAL, "storage-01")
    assert [f.path for f in plan.files] == [model_storage.EXPORTS_PATH]
    assert plan.packages == ["nfs-kernel-server"]
    exports = _directives(_file(plan, model_storage.EXPORTS_PATH))
    assert exports == ["/srv/models 198.51.100.0/24(ro,sync,no_subtree_check,root_squash,sec=sys)"]
    assert any("/srv/models/deepseek-r1-distill-qwen-32b" in line for line in plan.summary)


def test_writable_store_exports_read_write_but_gpus_still_mount_read_only() -> None:
    spec = _spec(HOSTS / "example-baremetal.yaml", read_only=False, networks=["storage", "mgmt"])
    exports = _directives(_file(_plan(spec, "storage-01"), model_storage.EXPORTS_PATH))
    assert exports == [
        "/srv/models 198.51.100.0/24(rw,sync,no_subtree_check,root_squash,sec=sys) "
        "192.0.2.0/24(rw,sync,no_subtree_check,root_squash,sec=sys)"
    ]
    unit = _file(_plan(spec, "gpu-01"), MOUNT_UNIT)
    assert (
        "Options=nfsvers=4.2,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,"
        "nconnect=8,ro" in unit.splitlines()
    )


def test_gpu_nodes_mount_the_export_over_the_storage_network() -> None:
    for node in ("gpu-01", "gpu-02", "gpu-03"):
        plan = _plan(BAREMETAL, node)
        assert [f.path for f in plan.files] == [MOUNT_UNIT]
        assert plan.packages == ["nfs-common"] and plan.services == ["data-models.mount"]
        assert _directives(_file(plan, MOUNT_UNIT)) == [
            "[Unit]",
            "Description=DeepSeek model store 'models' at /data/models",
            "Wants=network-online.target",
            "After=network-online.target",
            "[Mount]",
            "What=198.51.100.30:/srv/models",
            "Where=/data/models",
            "Type=nfs",
            "Options=nfsvers=4.2,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,nconnect=8,ro",
            "TimeoutSec=120",
            "[Install]",
            "WantedBy=remote-fs.target",
        ]


def test_nodes_that_neither_serve_nor_mount_have_no_role() -> None:
    for node in ("lb-01", "nat-01"):
        assert model_storage.plan(BAREMETAL, BAREMETAL.node(node)) is None
    assert model_storage.plan(AWS, AWS.node("lb-01")) is None


def test_extra_spec_options_are_kept_once() -> None:
    spec = _spec(HOSTS / "example-baremetal.yaml", options=["noatime", "hard", "rw"])
    unit = _file(_plan(spec, "gpu-01"), MOUNT_UNIT)
    assert (
        "Options=nfsvers=4.2,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,nconnect=8,"
        "noatime,ro" in unit.splitlines()
    )


EXPORT_OPTION = re.compile(
    r"^(ro|rw|sync|async|no_subtree_check|subtree_check|root_squash|no_root_squash|"
    r"all_squash|secure|insecure|sec=(sys|krb5|krb5i|krb5p)|fsid=\w+|anonuid=\d+|anongid=\d+)$"
)
EXPORT_CLIENT = re.compile(r"^(?P<host>[^\s()]+)\((?P<options>[^()\s]*)\)$")


def exports_problems(text: str) -> list[str]:
    """exports(5) syntax: `<absolute path> <client>(<options>)...`, known options only.

    `exportfs` needs the NFS kernel module, which this build machine lacks (docs/testing.md),
    so the check is this small parser of the documented format.
    """
    problems = []
    for line in _directives(text):
        path, *clients = line.split()
        if not path.startswith("/"):
            problems.append(f"export path is not absolute: {line!r}")
        if not clients:
            problems.append(f"no clients (would export to the world): {line!r}")
        for client in clients:
            match = EXPORT_CLIENT.match(client)
            if match is None:
                problems.append(f"client not `host(options)`: {client!r}")
                continue
            for option in match["options"].split(","):
                if not EXPORT_OPTION.match(option):
                    problems.append(f"unknown export option {option!r} in {client!r}")
    return problems


@pytest.mark.validators
def test_rendered_exports_parse() -> None:
    assert exports_problems(_file(_plan(BAREMETAL, "storage-01"), model_storage.EXPORTS_PATH)) == []


@pytest.mark.validators
def test_broken_exports_are_caught() -> None:
    assert exports_problems("/srv/models 198.51.100.0/24 (ro,sync)\n")  # space: world-readable
    assert exports_problems("/srv/models 198.51.100.0/24(ro,no_subtre_check)\n")
    assert exports_problems("srv/models 198.51.100.0/24(ro)\n")


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_systemd_accepts_every_mount_unit(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for node in spec.nodes:
        plan = model_storage.plan(spec, node)
        units = [f for f in plan.files if f.path.endswith(".mount")] if plan else []
        if units:
            check_systemd_units(units)


@pytest.mark.validators
def test_systemd_rejects_a_mount_unit_named_for_another_path() -> None:
    unit = next(f for f in _plan(BAREMETAL, "gpu-01").files if f.path == MOUNT_UNIT)
    renamed = HostFile("/etc/systemd/system/data-model.mount", unit.content)
    with pytest.raises(ConfigRejected, match="Where= setting doesn't match unit name"):
        check_systemd_units([renamed])
    moved = HostFile(MOUNT_UNIT, unit.content.replace("Where=/data/models", "Where=/models"))
    with pytest.raises(ConfigRejected, match="Where= setting doesn't match unit name"):
        check_systemd_units([moved])


# --- cloud stores --------------------------------------------------------------------------


def test_fsx_lustre_without_a_source_is_pending() -> None:
    plan = _plan(AWS, "gpu-01")
    lines = _directives(_file(plan, MOUNT_UNIT))
    assert "Type=lustre" in lines and "Options=flock,noatime,ro" in lines
    assert "What=models.fsx.invalid@tcp:/models" in lines
    assert any(line.startswith("PENDING: the fsx-lustre mount source") for line in plan.summary)
    assert plan.packages == ["lustre-client-utils", "lustre-client-modules-$(uname -r)"]


def test_fsx_lustre_with_pulumis_mount_target() -> None:
    target = "fs-0123456789abcdef0.fsx.us-east-2.amazonaws.com@tcp:/abcdefgh"
    plan = model_storage.plan(AWS, AWS.node("gpu-01"), {"models": target})
    assert plan is not None
    assert f"What={target}" in _directives(_file(plan, MOUNT_UNIT))
    assert not any("PENDING" in line for line in plan.summary)


def test_efs_mounts_nfs4_with_awss_options() -> None:
    target = "fs-0123456789abcdef0.efs.us-east-2.amazonaws.com:/"
    spec = _spec(HOSTS / "example-aws.yaml", kind="efs")
    plan = model_storage.plan(spec, spec.node("gpu-01"), {"models": target})
    assert plan is not None
    lines = _directives(_file(plan, MOUNT_UNIT))
    assert "Type=nfs4" in lines
    assert f"What={target}" in lines
    assert (
        "Options=nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,ro"
        in lines
    )
    assert plan.packages == ["nfs-common"]


# --- the lab -------------------------------------------------------------------------------


def test_lab_creates_nothing_and_says_so() -> None:
    for node in ("gpu-01", "gpu-02"):
        plan = _plan(LAB, node)
        assert plan.files == [] and plan.packages == []
        assert plan.skipped is not None and plan.skipped.startswith("lab:")
        assert any("read-only at /data/models" in line for line in plan.summary)
    # infra-01 is in the storage group but a bind store has no server.
    assert model_storage.plan(LAB, LAB.node("infra-01")) is None


def _mount(name: str) -> Any:
    return MountPoint().process((FIXTURES / name).read_text().splitlines())


def test_lab_mount_check() -> None:
    check = model_storage.bind_mount_problem
    assert check(_mount("findmnt-bind-ro.txt"), "gpu-01", "/data/models") is None
    problem = check(_mount("findmnt-bind-rw.txt"), "gpu-01", "/data/models")
    assert problem is not None and problem.startswith("gpu-01: /data/models is mounted read-write")
    problem = check(None, "gpu-02", "/data/models")
    assert problem is not None and problem.startswith("gpu-02: nothing is mounted at /data/models")


# --- local cache with a checksum manifest --------------------------------------------------

CACHED = _spec(HOSTS / "example-baremetal.yaml", local_cache="/nvme/models")


def test_cache_only_for_the_models_a_node_serves() -> None:
    gpu01 = _plan(CACHED, "gpu-01")
    unit = "/etc/systemd/system/deepfleet-model-cache-models.service"
    assert [f.path for f in gpu01.files] == [MOUNT_UNIT, model_storage.CACHE_SCRIPT, unit]
    assert next(f for f in gpu01.files if f.path == model_storage.CACHE_SCRIPT).mode == "755"
    assert "rsync" in gpu01.packages
    assert (
        "ExecStart=/usr/local/sbin/deepfleet-model-cache /data/models /nvme/models deepseek-r1"
        in _file(gpu01, unit).splitlines()
    )
    gpu03 = _plan(CACHED, "gpu-03")
    assert (
        "ExecStart=/usr/local/sbin/deepfleet-model-cache /data/models /nvme/models "
        "deepseek-r1-distill-qwen-32b" in _file(gpu03, unit).splitlines()
    )
    assert "RequiresMountsFor=/data/models /nvme/models" in _file(gpu03, unit).splitlines()
    # The storage node serves no model: no cache there.
    assert [f.path for f in _plan(CACHED, "storage-01").files] == [model_storage.EXPORTS_PATH]


@pytest.mark.validators
def test_systemd_accepts_the_cache_unit(tmp_path: Path) -> None:
    plan = _plan(CACHED, "gpu-01")
    script = tmp_path / "deepfleet-model-cache"
    script.write_text(_file(plan, model_storage.CACHE_SCRIPT))
    script.chmod(0o755)
    units = [
        # verify checks that ExecStart's program exists, and infra.validators only stubs the
        # programs it knows (NODE_PROGRAMS): point ExecStart at the rendered script instead.
        HostFile(f.path, f.content.replace(model_storage.CACHE_SCRIPT, str(script)))
        for f in plan.files
        if f.path.startswith("/etc/systemd/system/")
    ]
    systemd_verify(units)
    broken = [HostFile(u.path, u.content.replace("Type=oneshot", "Type=oneshoot")) for u in units]
    with pytest.raises(ConfigRejected, match="service type"):
        systemd_verify(broken)


@pytest.mark.validators
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_cache_script_passes_shellcheck(tmp_path: Path) -> None:
    script = tmp_path / "deepfleet-model-cache"
    script.write_text(_file(_plan(CACHED, "gpu-01"), model_storage.CACHE_SCRIPT))
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _make_model(root: Path, name: str) -> Path:
    model = root / name
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"architectures": ["DeepseekV3ForCausalLM"]}\n')
    (model / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 4096)
    (model / "sub" / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 4096)
    subprocess.run(
        "find . -type f ! -name SHA256SUMS -printf '%P\\0' | sort -z "
        "| xargs -0 sha256sum > SHA256SUMS",
        shell=True,
        cwd=model,
        check=True,
    )
    return model


def _cache_status(source: Path, cache: Path, models: list[str]) -> dict[str, str]:
    """Run the ModelCache fact's own command and process its output."""
    fact = ModelCache()
    output = subprocess.run(
        ["bash", "-c", fact.command(str(source), str(cache), models)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {s.model_path: s.state for s in fact.process(output.splitlines())}


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_cache_script_verifies_copies_and_catches_a_torn_one(tmp_path: Path) -> None:
    script = tmp_path / "deepfleet-model-cache"
    script.write_text(_file(_plan(CACHED, "gpu-01"), model_storage.CACHE_SCRIPT))
    script.chmod(0o755)
    source, cache = tmp_path / "store", tmp_path / "cache"
    model = _make_model(source, "deepseek-r1")
    _make_model(source, "qwen")

    def run(*models: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), str(source), str(cache), *models],
            capture_output=True,
            text=True,
            check=False,
        )

    assert _cache_status(source, cache, ["deepseek-r1"]) == {"deepseek-r1": "missing"}
    first = run("deepseek-r1")
    assert first.returncode == 0, first.stderr
    assert (cache / "deepseek-r1" / "sub" / "model-00002-of-00002.safetensors").exists()
    assert not (cache / "deepseek-r1.partial").exists()
    assert _cache_status(source, cache, ["deepseek-r1"]) == {"deepseek-r1": "verified"}
    assert "already verified" in run("deepseek-r1").stdout

    # A shard that changed after the manifest was written: the copy is torn.
    (source / "qwen" / "sub" / "model-00002-of-00002.safetensors").write_bytes(b"\x03" * 10)
    torn = run("qwen")
    assert torn.returncode == 1
    assert "does not match SHA256SUMS" in torn.stderr
    assert not (cache / "qwen").exists() and (cache / "qwen.partial").exists()
    assert _cache_status(source, cache, ["qwen"]) == {"qwen": "failed"}

    # A new manifest on the store makes the old verified copy stale until it is re-copied.
    (model / "extra.json").write_text("{}\n")
    subprocess.run("sha256sum extra.json >> SHA256SUMS", shell=True, cwd=model, check=True)
    assert _cache_status(source, cache, ["deepseek-r1"]) == {"deepseek-r1": "stale"}
    assert run("deepseek-r1").returncode == 0
    assert _cache_status(source, cache, ["deepseek-r1"]) == {"deepseek-r1": "verified"}

    # No manifest: refused, and reported.
    (source / "bare").mkdir()
    assert run("bare").returncode == 1
    assert _cache_status(source, cache, ["bare"]) == {"bare": "no-manifest"}


# --- the checks as pyinfra runs them -------------------------------------------------------

CHECK_DEPLOY = """\
import os

from roles import model_storage

model_storage.read_only_mount_present(
    name="[model_storage] Check the model mount",
    node_name="gpu-09",
    path=os.environ["MOUNT"],
)
model_storage.report_models(
    name="[model_storage] Report the model directories",
    node_name="gpu-09",
    mount_point=os.environ["MOUNT"],
    model_paths=["deepseek-r1", "qwen"],
    cache_dir=None,
)
"""


def _run_checks(mount: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    deploy = tmp_path / "checks.py"
    deploy.write_text(CHECK_DEPLOY)
    project = Path(__file__).resolve().parent.parent
    return subprocess.run(
        [str(project / ".venv/bin/pyinfra"), "@local", str(deploy), "-y"],
        capture_output=True,
        text=True,
        check=False,
        cwd=project,
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": str(project),
            "MOUNT": str(mount),
        },
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_mount_check_runs_at_deploy_time_and_fails_naming_the_node(tmp_path: Path) -> None:
    source, mount = tmp_path / "models", tmp_path / "mnt"
    (source / "deepseek-r1").mkdir(parents=True)
    mount.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(mount)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        read_only = _run_checks(mount, tmp_path)
        assert read_only.returncode == 0, read_only.stderr
        assert f"gpu-09: {mount}: missing qwen" in read_only.stderr + read_only.stdout

        subprocess.run(["mount", "-o", "remount,bind,rw", str(mount)], check=True)
        writable = _run_checks(mount, tmp_path)
        assert writable.returncode != 0
        assert f"gpu-09: {mount} is mounted read-write" in writable.stderr + writable.stdout
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    missing = _run_checks(mount, tmp_path)
    assert missing.returncode != 0
    assert f"gpu-09: nothing is mounted at {mount}" in missing.stderr + missing.stdout


# --- FSx for Lustre: AWS's client repository --------------------------------------------------


def _lustre_case(name: str) -> Case:
    (case,) = [c for c in load_cases("model_storage") if c.path.stem == name]
    return case


@pytest.mark.validators
@pytest.mark.parametrize("codename", ["jammy", "noble"])
def test_lustre_source_is_what_apt_reads(codename: str) -> None:
    [store] = load_spec(HOSTS / "example-aws.yaml").storage
    source = model_storage.lustre_source(store, codename)
    assert source.splitlines()[-1] == (
        "deb [signed-by=/etc/apt/keyrings/fsx-lustre.asc] "
        f"https://fsx-lustre-client-repo.s3.amazonaws.com/ubuntu {codename} main"
    )
    check_apt_source(HostFile(model_storage.LUSTRE_SOURCE, source))
    with pytest.raises(ConfigRejected):
        check_apt_source(HostFile(model_storage.LUSTRE_SOURCE, source.replace("] ", " ")))


def test_lustre_repository_comes_from_the_spec_and_the_release() -> None:
    """The mirror case's uploaded source is the spec's mirror with Ubuntu 24.04's suite."""
    case = _lustre_case("mirror-fsx-lustre-ubuntu-24.04")
    result = run_case(case, model_storage)
    spec, _ = case_spec(case)
    expected = model_storage.lustre_source(spec.storage[0], "noble")
    assert "https://mirror.example.internal/fsx-lustre/ubuntu noble main" in expected
    written = result.end_facts["files.Sha1File"][f"path={model_storage.LUSTRE_SOURCE}"]
    assert written == hashlib.sha1(expected.encode()).hexdigest()


def test_lustre_first_run_converges() -> None:
    """One deploy is enough: a second run on what the first left runs no command."""
    case = _lustre_case("fresh-fsx-lustre-ubuntu-22.04")
    first = run_case(case, model_storage)
    assert not first.failed, first.errors
    again = run_case(second_run(case, first), model_storage)
    assert again.commands == {}, again.commands


def test_lustre_module_follows_the_running_kernel() -> None:
    assert model_storage.lustre_packages("6.8.0-1024-aws") == [
        "lustre-client-utils",
        "lustre-client-modules-6.8.0-1024-aws",
        "lustre-client-modules-aws",  # follows the -aws flavour through kernel upgrades
    ]
    # Another flavour: its own module only (the -aws meta package would pull in that kernel).
    assert model_storage.lustre_packages("6.8.0-49-generic") == [
        "lustre-client-utils",
        "lustre-client-modules-6.8.0-49-generic",
    ]
