"""The node snapshot (roles/_state.py): one shell command, run here for real, and its parser."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from pyinfra.operations.util import any_changed

from roles import _state
from roles._converge import unchanged
from roles._state import NodeSnapshot, NodeSnapshotFact, PathState, parse_snapshot


def run_snapshot(paths: list[str], directories: list[str], sysctls: list[str]) -> list[str]:
    command = NodeSnapshotFact().command(tuple(paths), tuple(directories), tuple(sysctls))
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_files_directories_and_listing_are_read_in_one_command(tmp_path: Path) -> None:
    config = tmp_path / "app.conf"
    config.write_text("key = value\n")
    config.chmod(0o640)
    (tmp_path / "netplan").mkdir()
    (tmp_path / "netplan" / "50-cloud-init.yaml").write_text("network: {}\n")
    missing = tmp_path / "absent.conf"

    snapshot = parse_snapshot(
        run_snapshot(
            [str(config), str(missing), str(tmp_path / "netplan")],
            [str(tmp_path / "netplan"), str(tmp_path / "nowhere")],
            [],
        )
    )

    state = snapshot.paths[str(config)]
    assert state.kind == "regular file"
    assert state.mode == 0o640
    assert state.sha1 == hashlib.sha1(b"key = value\n").hexdigest()
    assert state.user == Path(config).owner()
    assert str(missing) not in snapshot.paths
    assert snapshot.paths[str(tmp_path / "netplan")].kind == "directory"
    assert snapshot.listed[str(tmp_path / "netplan")] == [
        str(tmp_path / "netplan" / "50-cloud-init.yaml")
    ]
    assert snapshot.hostname == os.uname().nodename
    assert "dpkg" in snapshot.packages  # this machine is Debian: dpkg lists itself


def test_sysctl_units_and_host_sections_are_parsed() -> None:
    output = [
        "##stat",
        "##sha1",
        "##list",
        "##sysctl",
        "net.ipv4.tcp_rmem = 4096\t87380\t268435456",
        "net.core.somaxconn = 4096",
        "##units",
        "Id=chrony.service",
        "SubState=running",
        "UnitFileState=enabled",
        "",
        "Id=haproxy.service",
        "SubState=dead",
        "UnitFileState=disabled",
        "",
        "Id=data-models.mount",
        "SubState=mounted",
        "UnitFileState=generated",
        "##host",
        "gpu-01",
        "Asia/Shanghai",
    ]
    snapshot = parse_snapshot(output)
    assert snapshot.sysctls == {
        "net.ipv4.tcp_rmem": "4096 87380 268435456",
        "net.core.somaxconn": "4096",
    }
    assert snapshot.active == {
        "chrony.service": True,
        "haproxy.service": False,
        "data-models.mount": True,
    }
    assert snapshot.enabled == {
        "chrony.service": True,
        "haproxy.service": False,
        "data-models.mount": False,
    }
    assert (snapshot.hostname, snapshot.timezone) == ("gpu-01", "Asia/Shanghai")


def test_a_node_without_systemd_or_files_gives_an_empty_snapshot_not_an_error() -> None:
    snapshot = parse_snapshot(run_snapshot(["/nonexistent/a"], ["/nonexistent"], ["no.such.key"]))
    assert snapshot.paths == {}
    assert snapshot.sysctls == {}


def test_only_an_exact_match_skips_an_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    content = b"server ntp.example\n"
    snapshot = NodeSnapshot(
        paths={
            "/etc/chrony/chrony.conf": PathState(
                "regular file", 0o644, "root", "root", hashlib.sha1(content).hexdigest()
            ),
            "/etc/deepfleet": PathState("directory", 0o755, "root", "root"),
        },
        sysctls={"net.core.somaxconn": "4096"},
        active={"chrony.service": True, "docker.service": False},
        enabled={"chrony.service": True, "docker.service": True},
    )
    monkeypatch.setattr(_state, "snapshot", lambda: snapshot)
    path = "/etc/chrony/chrony.conf"
    assert _state.file_matches(path, content, "644", "root", "root")
    assert not _state.file_matches(path, content + b"#", "644", "root", "root")
    assert not _state.file_matches(path, content, "600", "root", "root")
    assert not _state.file_matches(path, content, "644", "_chrony", "root")
    assert not _state.file_matches("/etc/deepfleet", content, "755", "root", "root")
    assert not _state.file_matches("/etc/other", content, "644", "root", "root")
    assert _state.directory_matches("/etc/deepfleet")
    assert _state.unit_is("chrony", running=True, enabled=True)
    assert not _state.unit_is("docker", running=True, enabled=True)
    assert _state.unit_is("docker", running=None, enabled=True)
    assert not _state.unit_is("haproxy.service", running=True, enabled=None)
    assert _state.sysctl_is("net.core.somaxconn", "4096")
    assert not _state.sysctl_is("net.core.somaxconn", "1024")

    monkeypatch.setattr(_state, "snapshot", lambda: None)
    assert not _state.file_matches(path, content, "644", "root", "root")
    assert not _state.unit_is("chrony", running=True, enabled=True)


def test_a_skipped_step_reads_as_completed_without_change() -> None:
    meta = unchanged("[base] Write /etc/hosts")
    assert meta.is_complete() and meta.did_succeed()
    assert not meta.did_change()
    assert not any_changed(meta, unchanged("[base] Write /etc/hostname"))()


FAKE_DOCKER = """#!/bin/sh
# Answers like docker for one image, one running container and the daemon; nothing else.
case "$*" in
  "image inspect --format {{json .}} deepfleet/sglang-standin:0.1.0")
    echo '{"Id": "sha256:aa11", "RepoTags": ["deepfleet/sglang-standin:0.1.0"]}' ;;
  "inspect --type container --format {{json .}} deepfleet-sglang-chat-r0")
    echo '{"Name": "/deepfleet-sglang-chat-r0", "Image": "sha256:aa11",'
    echo ' "Config": {"Image": "deepfleet/sglang-standin:0.1.0", "Cmd": ["--tp", "1"]},'
    echo ' "State": {"Running": true}, "HostConfig": {"NetworkMode": "host"}}' ;;
  "info --format {{json .}}")
    echo '{"ServerVersion": "26.1.5", "Runtimes": {"runc": {}}, "DockerRootDir": "/var/lib/docker"}' ;;
  *) echo "Error: No such object" >&2; exit 1 ;;
esac
"""


def run_docker_snapshot(
    path: str, images: tuple[str, ...], containers: tuple[str, ...]
) -> list[str]:
    command = NodeSnapshotFact().command((), (), (), (), images, containers, True)
    result = subprocess.run(
        ["/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATH": path},
    )
    return result.stdout.splitlines()


def test_docker_images_containers_and_info_come_with_the_snapshot(tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    images = ("deepfleet/sglang-standin:0.1.0", "lmsysorg/sglang:v0.4.6")
    containers = ("deepfleet-sglang-chat-r0", "deepfleet-sglang-chat-r1")

    snapshot = parse_snapshot(run_docker_snapshot(f"{tmp_path}:/usr/bin:/bin", images, containers))

    standin = snapshot.images["deepfleet/sglang-standin:0.1.0"]
    assert standin is not None and standin.id == "sha256:aa11"
    assert snapshot.images["lmsysorg/sglang:v0.4.6"] is None  # asked, not on the node
    engine = snapshot.containers["deepfleet-sglang-chat-r0"]
    assert engine is not None and engine.running and engine.command == ("--tp", "1")
    assert engine.network_mode == "host"
    assert snapshot.containers["deepfleet-sglang-chat-r1"] is None
    assert snapshot.docker_info_asked
    assert snapshot.docker_info is not None
    assert snapshot.docker_info["ServerVersion"] == "26.1.5"


def test_a_node_without_docker_answers_absent_images_and_no_daemon(tmp_path: Path) -> None:
    # An empty PATH: no docker (nor anything else) to run, as on a node before its runtime.
    snapshot = parse_snapshot(
        run_docker_snapshot(str(tmp_path), ("lmsysorg/sglang:v0.4.6",), ("engine",))
    )
    assert snapshot.images == {"lmsysorg/sglang:v0.4.6": None}
    assert snapshot.containers == {"engine": None}
    assert snapshot.docker_info_asked and snapshot.docker_info is None


def test_docker_answers_come_from_the_snapshot_only_when_it_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked_facts: list[object] = []

    class FakeHost:
        def get_fact(self, fact: object, **kwargs: object) -> None:
            asked_facts.append(fact)
            return None

    monkeypatch.setattr(_state, "host", FakeHost())
    from facts.engine import ImageState

    snapshot = NodeSnapshot(images={"a:1": ImageState("sha256:1")}, containers={"engine": None})
    monkeypatch.setattr(_state, "snapshot", lambda: snapshot)
    assert _state.docker_image("a:1") == ImageState("sha256:1")
    assert _state.engine_container("engine") is None
    assert _state.docker_info_before_run() == (False, None)
    assert asked_facts == []
    assert _state.docker_image("b:2") is None  # not in the snapshot: the fact is asked
    assert len(asked_facts) == 1
