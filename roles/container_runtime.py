"""container_runtime: Docker Engine (+ compose plugin) and, on GPU nodes, the NVIDIA runtime.

Which nodes: GPU nodes (SGLang runs in containers), the monitoring node (its exporters and
dashboards run as containers) and load balancers only when ``load_balancer.open_webui`` is set
(Open WebUI is a container). Everything else gets no container engine.

Production: docker-ce from Docker's apt repository and the NVIDIA Container Toolkit from
NVIDIA's, each with a ``signed-by`` keyring downloaded from the spec's key URL (an air-gapped
site points ``container_runtime.*`` and ``nvidia.container_toolkit_*`` at its mirror).
``/etc/docker/daemon.json`` is rendered offline: the ``nvidia`` runtime entry exactly as
``nvidia-ctk runtime configure --runtime=docker`` writes it, json-file logs with rotation, the
data-root. Docker restarts only when that file changed.

Lab: no vendor repositories and no GPUs; Debian's ``docker.io`` from the node's own apt
sources stands in, without the toolkit. The plan says so and still lists the production steps.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.context import host
from pyinfra.facts.server import Arch, LinuxDistribution
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed

from facts.docker import DockerInfo, problems
from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Node
from roles import _converge as converge
from roles import _state
from roles._apt import refresh_lists
from roles._files import put_file
from roles._state import Probes
from roles.nvidia_driver import KEYRING_DIR, add_repository, expect, keyring_directory

ROLE = "container_runtime"
DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_KEYRING = f"{KEYRING_DIR}/docker.asc"
DOCKER_SOURCE = "/etc/apt/sources.list.d/deepfleet-docker.list"
TOOLKIT_KEYRING = f"{KEYRING_DIR}/nvidia-container-toolkit.asc"
TOOLKIT_SOURCE = "/etc/apt/sources.list.d/deepfleet-nvidia-container-toolkit.list"
DOCKER_PACKAGES = (
    "docker-ce",
    "docker-ce-cli",
    "containerd.io",
    "docker-buildx-plugin",
    "docker-compose-plugin",
)
# The toolkit's packages move together: pinning one pins all (NVIDIA's install guide).
TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
LAB_PACKAGES = ("docker.io",)


def wants_gpu_runtime(node: Node) -> bool:
    return node.gpus is not None or node.in_group("gpu")


def concerns(spec: ClusterSpec, node: Node) -> bool:
    lb = spec.load_balancer
    return (
        wants_gpu_runtime(node)
        or (spec.monitoring is not None and spec.monitoring.node == node.name)
        or (lb is not None and lb.open_webui and node.name in lb.nodes)
    )


def nvidia_runtime_enabled(spec: ClusterSpec, node: Node) -> bool:
    """The toolkit and the runtime entry: GPU nodes outside the lab."""
    return wants_gpu_runtime(node) and not spec.is_lab


def daemon_config(spec: ClusterSpec, node: Node) -> dict[str, Any]:
    runtime = spec.container_runtime
    config: dict[str, Any] = {
        "data-root": runtime.data_root,
        "log-driver": "json-file",
        "log-opts": {"max-file": str(runtime.log_max_file), "max-size": runtime.log_max_size},
    }
    if nvidia_runtime_enabled(spec, node):
        # What `nvidia-ctk runtime configure --runtime=docker` adds (it does not make it the
        # default runtime: containers ask for GPUs with --gpus / device requests).
        config["runtimes"] = {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}
    return config


def daemon_json(spec: ClusterSpec, node: Node) -> str:
    # nvidia-ctk writes sorted keys with four-space indents; so do we, so that a node configured
    # by hand with nvidia-ctk and one configured here hold the same file.
    return json.dumps(daemon_config(spec, node), indent=4, sort_keys=True) + "\n"


def toolkit_packages(version: str | None) -> list[str]:
    return [
        f"{p}={version}" if version else p
        for p in (TOOLKIT_PACKAGES if version else TOOLKIT_PACKAGES[:1])
    ]


def docker_arch(uname_machine: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(uname_machine, "amd64")


def codename(distribution: Mapping[str, Any]) -> str:
    meta = distribution.get("release_meta") or {}
    for key in ("VERSION_CODENAME", "UBUNTU_CODENAME", "DISTRIB_CODENAME", "CODENAME"):
        if meta.get(key):
            return str(meta[key])
    raise DeployError(
        f"no release codename for {distribution.get('name')} {distribution.get('major')}: "
        "Docker's repository is laid out by codename (jammy, noble)"
    )


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    if not concerns(spec, node):
        return None
    runtime, nvidia = spec.container_runtime, spec.nvidia
    gpu = wants_gpu_runtime(node)
    summary = [
        f"add Docker's repository {runtime.repository} (key {runtime.key_url})",
        f"install {' '.join(DOCKER_PACKAGES)}",
    ]
    if gpu:
        summary += [
            f"add the NVIDIA Container Toolkit repository {nvidia.container_toolkit_repository} "
            f"(key {nvidia.container_toolkit_key_url})",
            f"install {' '.join(toolkit_packages(nvidia.container_toolkit_version))}",
        ]
    summary += [
        f"write {DAEMON_JSON}: "
        + ("nvidia runtime, " if gpu else "")
        + f"json-file logs {runtime.log_max_size} x {runtime.log_max_file}, data-root {runtime.data_root}",
        "enable docker; restart it only when daemon.json changed",
        "verify with docker info" + (": the nvidia runtime is registered" if gpu else ""),
    ]
    packages = list(DOCKER_PACKAGES) + (list(TOOLKIT_PACKAGES[:1]) if gpu else [])
    if spec.is_lab:
        summary.insert(
            0,
            "LAB: Debian's docker.io from the node's apt sources instead of Docker's repository"
            + ("; NVIDIA Container Toolkit and nvidia runtime skipped (no GPUs)" if gpu else "")
            + " -- production does:",
        )
        packages = list(LAB_PACKAGES)
    return RolePlan(
        role=ROLE,
        summary=summary,
        files=[HostFile(DAEMON_JSON, daemon_json(spec, node))],
        packages=packages,
        services=["docker"],
    )


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(units=("docker.service",), docker_info=True)


@deploy("container_runtime")
def apply(spec: ClusterSpec, node: Node) -> None:
    role_plan = plan(spec, node)
    if role_plan is None or role_plan.skipped:
        return
    runtime, nvidia = spec.container_runtime, spec.nvidia
    gpu_runtime = nvidia_runtime_enabled(spec, node)

    installs: list[OperationMeta] = []
    if spec.is_lab:
        # The lab reaches no vendor repository: Debian's engine from the node's own sources.
        installs.append(
            converge.packages(
                name=f"[{ROLE}] Install {' '.join(LAB_PACKAGES)} (lab)",
                packages=list(LAB_PACKAGES),
            )
        )
    else:
        keyring_directory(ROLE)
        distribution = host.get_fact(LinuxDistribution)
        machine = host.get_fact(Arch)
        repo_ops = add_repository(
            ROLE,
            runtime.key_url,
            DOCKER_KEYRING,
            DOCKER_SOURCE,
            render(
                "container_runtime/docker.list.j2",
                arch=docker_arch(machine),
                keyring=DOCKER_KEYRING,
                repository=runtime.repository.rstrip("/"),
                codename=codename(distribution),
            ),
            replaces=("/etc/apt/sources.list.d/docker.list",),  # Docker's install guide
        )
        if gpu_runtime:
            repo_ops += add_repository(
                ROLE,
                nvidia.container_toolkit_key_url,
                TOOLKIT_KEYRING,
                TOOLKIT_SOURCE,
                render(
                    "container_runtime/nvidia-container-toolkit.list.j2",
                    keyring=TOOLKIT_KEYRING,
                    repository=nvidia.container_toolkit_repository.rstrip("/"),
                ),
                # NVIDIA's install guide
                replaces=("/etc/apt/sources.list.d/nvidia-container-toolkit.list",),
            )
        refresh_lists(
            f"[{ROLE}] Update apt lists after a repository change",
            condition=any_changed(*repo_ops),
        )
        installs.append(
            converge.packages(
                name=f"[{ROLE}] Install {' '.join(DOCKER_PACKAGES)}",
                packages=list(DOCKER_PACKAGES),
            )
        )
        if gpu_runtime:
            wanted = toolkit_packages(nvidia.container_toolkit_version)
            installs.append(
                converge.packages(
                    name=f"[{ROLE}] Install {' '.join(wanted)}",
                    packages=wanted,
                    allow_downgrades=bool(nvidia.container_toolkit_version),
                )
            )

    (daemon_file,) = role_plan.files
    written = put_file(daemon_file, ROLE)
    started = converge.service(
        name=f"[{ROLE}] Enable and start docker",
        service="docker",
        running=True,
        enabled=True,
    )
    touched = [*installs, written, started]

    def docker_info() -> dict[str, Any] | None:
        # The snapshot's answer stands while preparing, and when executing if this run changed
        # nothing Docker runs from: one round trip fewer per node on a no-op run.
        asked, before = _state.docker_info_before_run()
        if asked and (not host.state.is_executing or not any_changed(*touched)()):
            return before
        return host.get_fact(DockerInfo)

    systemd.service(
        name=f"[{ROLE}] Restart docker for the new daemon.json",
        service="docker",
        # Restart only a running service; the operation before started it.
        running=None,
        restarted=True,
        _if=written.did_change,
    )
    expect(
        name=f"[{ROLE}] Verify the engine with docker info",
        what="docker check",
        problems=lambda: [
            f"{node.name}: {problem}"
            for problem in problems(
                docker_info(), want_nvidia=gpu_runtime, data_root=runtime.data_root
            )
        ],
    )
