"""nvidia_driver: the NVIDIA server driver, fabric manager (HGX), persistence, holds, reboot.

Order of the deploy (each step a desired-state operation named for a drift report):

1. purge driver packages of another branch (and old CUDA) -- only those the node has;
2. CUDA repository (key + source from the spec: a mirror replaces them on air-gapped sites);
3. install ``nvidia-driver-<branch>-<flavour>[-open]`` (exact version when pinned) and, on
   NVSwitch boards, ``nvidia-fabricmanager-<branch>`` of exactly the same driver version;
4. blacklist nouveau, ``update-initramfs -u`` only when that file changed;
5. hold the stack (``apt-mark hold``): the metapackages and every installed package of the
   branch, read from the node when the hold runs (after the install), and keep it out of
   unattended-upgrades;
6. reboot when the kernel module changed and ``nvidia.allow_reboot`` (one node at a time,
   ``_serial=True``); otherwise say "reboot required" and stop short of the checks;
7. enable persistenced / fabric manager, then verify with ``nvidia-smi`` against the spec.

The lab has no GPUs and no vendor repositories: the plan says so (``skipped``) and still lists
what production does; the deploy logs one line saying so and adds no operation.

Ubuntu only (22.04, 24.04): NVIDIA's Debian 12 repository names the driver packages without a
branch (``nvidia-driver``, ``nvidia-kernel-dkms``, ``libcuda1``) and locks a branch with
``nvidia-driver-pinning-<branch>``, which the purge and holds here do not handle; a Debian node
fails with `require_ubuntu`'s message instead of getting a half-right stack.

Custom operations live here and are shared by the GPU-stack roles: `hold_driver_stack` and
`expect` (a verification that fails the host with a message), with `require_ubuntu` and
`report_lab_skip`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, StringCommand
from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.operation import OperationMeta, operation
from pyinfra.context import host
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.server import Arch, LinuxDistribution
from pyinfra.operations import apt, files, python, server, systemd
from pyinfra.operations.util import any_changed

from facts.nvidia import (
    FabricManagerState,
    HeldPackages,
    NvidiaKernelModule,
    NvidiaSmi,
    NvidiaSmiState,
    reboot_pending,
)
from infra.errors import UserError
from infra.gpus import resolve_gpu
from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Node, NvidiaStack
from roles._apt import refresh_lists
from roles._files import put_file

ROLE = "nvidia_driver"
LAB_SKIP = "lab: no GPUs / no vendor repositories"
KEYRING_DIR = "/etc/apt/keyrings"
CUDA_KEYRING = f"{KEYRING_DIR}/cuda-archive-keyring.asc"
CUDA_SOURCE = "/etc/apt/sources.list.d/deepfleet-cuda.list"
NOUVEAU_BLACKLIST = "/etc/modprobe.d/blacklist-nouveau.conf"
UNATTENDED_BLACKLIST = "/etc/apt/apt.conf.d/51deepfleet-nvidia-no-unattended"
# HGX boards take minutes to POST with eight GPUs and NVSwitches.
REBOOT_DELAY_S = 60
REBOOT_TIMEOUT_S = 1200
# unattended-upgrades matches these as regular expressions from the start of the name.
UNATTENDED_PATTERNS = (
    "nvidia-",
    "libnvidia-",
    "linux-modules-nvidia-",
    "linux-objects-nvidia-",
    "linux-signatures-nvidia-",
    "xserver-xorg-video-nvidia-",
    "cuda-drivers",
)
_NVIDIA_PREFIXES = (
    "nvidia-",
    "libnvidia-",
    "linux-modules-nvidia-",
    "linux-objects-nvidia-",
    "linux-signatures-nvidia-",
    "xserver-xorg-video-nvidia-",
)
_BRANCH = re.compile(r"-(\d{3})(?:-|$)")


# --- pure decisions (plan and apply share them) -------------------------------------------------


def driver_package(nvidia: NvidiaStack) -> str:
    flavour = "-server" if nvidia.driver_flavour == "server" else ""
    return f"nvidia-driver-{nvidia.driver_branch}{flavour}{'-open' if nvidia.open_kernel_modules else ''}"


def fabricmanager_package(nvidia: NvidiaStack) -> str:
    return f"nvidia-fabricmanager-{nvidia.driver_branch}"


def upstream_version(package_version: str) -> str:
    """570.172.08-0ubuntu1 -> 570.172.08 (an epoch "1:" is dropped too)."""
    return package_version.split(":")[-1].split("-")[0]


def fabricmanager_version(nvidia: NvidiaStack) -> str | None:
    if nvidia.fabricmanager_version:
        return nvidia.fabricmanager_version
    if nvidia.driver_version:
        return f"{upstream_version(nvidia.driver_version)}-1"
    return None


def _pinned(package: str, version: str | None) -> str:
    return f"{package}={version}" if version else package


def wanted_packages(nvidia: NvidiaStack, node: Node) -> list[str]:
    """What apt installs, with the exact versions when the spec pins them."""
    wanted = [_pinned(driver_package(nvidia), nvidia.driver_version)]
    if node.gpus is not None and node.gpus.nvswitch:
        wanted.append(_pinned(fabricmanager_package(nvidia), fabricmanager_version(nvidia)))
    return wanted


def package_branch(name: str) -> int | None:
    """The driver branch a package belongs to (nvidia-utils-570-server -> 570), else None."""
    if not name.startswith(_NVIDIA_PREFIXES):
        return None
    match = _BRANCH.search(name)
    return int(match.group(1)) if match else None


def stale_packages(installed: Iterable[str], branch: int) -> list[str]:
    """Installed packages that conflict with driver BRANCH; empty on a converged node.

    - driver packages of any other branch;
    - CUDA's driver metapackages (``cuda-drivers*``, ``cuda``): they follow the newest branch
      of the CUDA repository and would pull it past the holds;
    - when another branch is present, every ``cuda*`` package as well (the field recipes'
      ``apt --purge remove "cuda*"``): a host toolkit built for the old driver goes with it.
    """
    names = sorted(set(installed))
    foreign = [n for n in names if (b := package_branch(n)) is not None and b != branch]
    metapackages = [n for n in names if n == "cuda" or n.startswith("cuda-drivers")]
    cuda = [n for n in names if n.startswith("cuda")] if foreign else []
    return sorted(set(foreign) | set(metapackages) | set(cuda))


def branch_packages(installed: Iterable[str], branch: int) -> list[str]:
    return sorted(n for n in set(installed) if package_branch(n) == branch)


def require_ubuntu(node: str, role: str, distribution: Mapping[str, Any]) -> None:
    """Refuse anything but Ubuntu, naming the node and saying what to do instead.

    Debian 12 has a CUDA repository (``repos/debian12/x86_64``), but its driver packages carry
    no branch in their names (``nvidia-driver``, ``nvidia-kernel-dkms``, ``libcuda1``,
    ``nvidia-smi``; the branch is locked with ``nvidia-driver-pinning-<branch>``), so
    `stale_packages`, `branch_packages` and the ``-<branch>-server`` install would all be
    wrong there. Failing here beats installing a stack whose holds miss the libraries.
    """
    name = str(distribution.get("name") or "").lower()
    if name == "ubuntu" and distribution.get("major") is not None:
        return
    release = str(
        (distribution.get("release_meta") or {}).get("PRETTY_NAME")
        or f"{distribution.get('name')} {distribution.get('major')}"
    )
    raise DeployError(
        f"{node}: the {role} role supports Ubuntu 22.04 and 24.04 only; this node runs "
        f"{release}. NVIDIA's Debian repository names the driver packages without a branch "
        "(nvidia-driver, nvidia-kernel-dkms, libcuda1), so deepfleet's purge, install and "
        "holds would be wrong there. Reinstall the node with Ubuntu 22.04 or 24.04 (the "
        "SGLang recipes' OS), or take it out of group gpu / remove its gpus: and rdma: "
        "entries in the spec and prepare it by hand (docs/gpu-stack.md, 'Debian 12')."
    )


def cuda_distro(distribution: Mapping[str, Any]) -> str:
    """LinuxDistribution fact (Ubuntu: see `require_ubuntu`) -> the CUDA repository's
    directory name (ubuntu2204)."""
    return f"ubuntu{distribution.get('major')}{int(distribution.get('minor') or 0):02d}"


def repository_arch(uname_machine: str) -> str:
    return {"x86_64": "x86_64", "aarch64": "sbsa", "arm64": "sbsa"}.get(uname_machine, "x86_64")


def gpu_problems(
    node: Node, nvidia: NvidiaStack, smi: NvidiaSmiState | None, fabric: str | None
) -> list[str]:
    """The node's GPUs as nvidia-smi sees them against the spec; empty when they match."""
    name = node.name
    if smi is None:
        return [f"{name}: nvidia-smi is not installed"]
    if smi["error"]:
        return [f"{name}: nvidia-smi failed: {smi['error']}"]
    found: list[str] = []
    gpus = smi["gpus"]
    if node.gpus is not None:
        if len(gpus) != node.gpus.count:
            found.append(
                f"{name}: nvidia-smi sees {len(gpus)} GPUs, the spec says "
                f"{node.gpus.count}x {node.gpus.model} (reseat or check `dmesg | grep NVRM`)"
            )
        wrong = sorted({g["name"] for g in gpus if not _same_model(g["name"], node.gpus.model)})
        if wrong:
            found.append(f"{name}: GPUs are {', '.join(wrong)}, the spec says {node.gpus.model}")
    versions = sorted({g["driver_version"] for g in gpus})
    wanted = upstream_version(nvidia.driver_version) if nvidia.driver_version else None
    for version in versions:
        if not version.startswith(f"{nvidia.driver_branch}.") or (wanted and version != wanted):
            found.append(
                f"{name}: driver {version} runs, the spec wants "
                f"{wanted or f'branch {nvidia.driver_branch}'}"
            )
    off = [str(g["index"]) for g in gpus if not g["persistence_mode"]]
    if off:
        found.append(f"{name}: persistence mode is off on GPU {', '.join(off)}")
    if fabric is not None and fabric != "active":
        found.append(
            f"{name}: nvidia-fabricmanager is {fabric} (NVSwitch boards need it active with "
            "exactly the driver's version: `journalctl -u nvidia-fabricmanager`)"
        )
    return found


def _same_model(smi_name: str, spec_model: str) -> bool:
    try:
        return resolve_gpu(smi_name).name == resolve_gpu(spec_model).name
    except UserError:
        tokens = re.split(r"[\s_-]+", smi_name.lower())
        return spec_model.lower() in tokens


def concerns(node: Node) -> bool:
    return node.gpus is not None or node.in_group("gpu")


# --- plan ----------------------------------------------------------------------------------------


def planned_files() -> list[HostFile]:
    return [
        HostFile(NOUVEAU_BLACKLIST, render("nvidia_driver/blacklist-nouveau.conf")),
        HostFile(
            UNATTENDED_BLACKLIST,
            render("nvidia_driver/unattended-upgrades.conf.j2", patterns=UNATTENDED_PATTERNS),
        ),
    ]


def plan(spec: ClusterSpec, node: Node) -> RolePlan | None:
    if not concerns(node):
        return None
    nvidia = spec.nvidia
    wanted = wanted_packages(nvidia, node)
    hgx = node.gpus is not None and node.gpus.nvswitch
    summary = [
        f"purge driver packages of branches other than {nvidia.driver_branch} and old CUDA "
        "(only those installed)",
        f"add the CUDA repository {nvidia.repository}/ubuntu<release>/<arch> "
        f"(key {nvidia.repository_key_url})",
        f"install {', '.join(wanted)}"
        + (
            ""
            if nvidia.driver_version
            else f" (not pinned: newest of branch {nvidia.driver_branch})"
        ),
    ]
    if hgx:
        summary.append("enable and start nvidia-fabricmanager (same version as the driver)")
    summary += [
        "enable nvidia-persistenced",
        f"blacklist nouveau; update-initramfs -u when {NOUVEAU_BLACKLIST} changes",
        f"hold the driver stack (apt-mark hold: {', '.join(p.split('=')[0] for p in wanted)} "
        f"and every installed package of branch {nvidia.driver_branch}, read after the "
        "install) and keep it out of unattended-upgrades",
        "reboot one node at a time when the kernel module changed"
        if nvidia.allow_reboot
        else "report 'reboot required' when the kernel module changed (nvidia.allow_reboot is false)",
    ]
    if node.gpus is not None:
        summary.append(
            f"verify with nvidia-smi: {node.gpus.count}x {node.gpus.model}, driver "
            f"{upstream_version(nvidia.driver_version) if nvidia.driver_version else nvidia.driver_branch}"
            f", persistence on{', fabric manager active' if hgx else ''}"
        )
    packages = [p.split("=")[0] for p in wanted]
    services = ["nvidia-persistenced"] + (["nvidia-fabricmanager"] if hgx else [])
    if spec.is_lab:
        return RolePlan(
            role=ROLE, summary=summary, packages=packages, services=services, skipped=LAB_SKIP
        )
    return RolePlan(
        role=ROLE, summary=summary, files=planned_files(), packages=packages, services=services
    )


# --- shared custom operations ---------------------------------------------------------------------


def driver_stack(packages: Iterable[str], installed: Iterable[str], branch: int) -> list[str]:
    """What to hold: PACKAGES (the metapackages) and every installed package of BRANCH."""
    return sorted({p.split("=")[0] for p in packages} | set(branch_packages(installed, branch)))


@operation()
def hold_driver_stack(packages: list[str], branch: int) -> Any:
    """Hold PACKAGES and every installed package of driver BRANCH that is not held yet.

    Both facts are read when the operation runs, not when the deploy is planned: on a fresh
    node the install before it pulls in the libraries (libnvidia-compute-*, nvidia-utils-*,
    nvidia-dkms-*, ...), and a list taken before the install would leave them for a second
    deploy. pyinfra 3 does not cache facts, so these see the node as the install left it.
    """
    stack = driver_stack(packages, host.get_fact(DebPackages), branch)
    held: list[str] = host.get_fact(HeldPackages)
    missing = [p for p in stack if p not in held]
    if missing:
        yield StringCommand("apt-mark", "hold", *missing)
    else:
        host.noop(f"the driver stack is held ({len(stack)} packages)")


def report_lab_skip(role: str, reason: str) -> None:
    """One line in the deploy's output for a role the lab skips: a log line, not an operation,
    so the lab's deploy counts no change for it (``deepfleet plan`` lists the production
    steps)."""
    logger.info(f"{host.print_prefix}[{role}] skipped: {reason}; `deepfleet plan` shows its steps")


def _fail(state: Any, host: Any, what: str, problems: list[str]) -> bool:
    # pyinfra passes state and host to callbacks whose parameters carry exactly these names.
    for problem in problems:
        logger.error(f"{host.print_prefix}{what} failed: {problem}")
    return False


@operation()
def expect(what: str, problems: Callable[[], list[str]]) -> Any:
    """A check that reads facts: nothing when PROBLEMS() is empty, otherwise fail the host
    with every problem logged (naming node, device, port as the problems do)."""
    found = problems()
    if found:
        yield FunctionCommand(_fail, (what, found), {})


def _reboot_required(state: Any, host: Any, node: str) -> bool:
    logger.warning(
        f"{host.print_prefix}REBOOT REQUIRED on {node}: the NVIDIA kernel module changed and "
        "nvidia.allow_reboot is false. Drain the node, reboot it, then re-run the deploy "
        "(docs/gpu-stack.md)."
    )
    return True


def keyring_directory(role: str) -> OperationMeta:
    """/etc/apt/keyrings: Ubuntu 22.04 does not always have it (Docker's guide creates it)."""
    return files.directory(name=f"[{role}] Create {KEYRING_DIR}", path=KEYRING_DIR, mode="755")


def add_repository(
    role: str,
    key_url: str,
    keyring: str,
    source_path: str,
    source: str,
    replaces: tuple[str, ...] = (),
) -> list[OperationMeta]:
    """Signing key (ASCII-armoured, read by signed-by) and one-line source; returns the ops.

    REPLACES names the source files the vendors' install guides create. Left beside ours they
    name the same repository with another ``signed-by`` keyring, and apt then refuses every
    update ("Conflicting values set for option Signed-By"), so they go.
    """
    key = files.download(
        name=f"[{role}] Download repository key {key_url}",
        src=key_url,
        dest=keyring,
        mode="644",
    )
    listed = put_file(HostFile(source_path, source), role)
    removed = [
        files.file(
            name=f"[{role}] Remove {path} (superseded by {source_path})",
            path=path,
            present=False,
        )
        for path in replaces
    ]
    return [key, listed, *removed]


# --- apply ---------------------------------------------------------------------------------------


@deploy("nvidia_driver")
def apply(spec: ClusterSpec, node: Node) -> None:
    role_plan = plan(spec, node)
    if role_plan is None:
        return
    if role_plan.skipped:
        report_lab_skip(ROLE, role_plan.skipped)
        return
    distribution = host.get_fact(LinuxDistribution)
    require_ubuntu(node.name, ROLE, distribution)
    nvidia = spec.nvidia
    installed = host.get_fact(DebPackages)

    stale = stale_packages(installed, nvidia.driver_branch)
    purged = None
    if stale:
        purged = apt.packages(
            name=f"[{ROLE}] Purge stale driver and CUDA packages {' '.join(stale)}",
            packages=stale,
            present=False,
            purge=True,
            extra_uninstall_args="--allow-change-held-packages",
        )

    keyring_directory(ROLE)
    distro = cuda_distro(distribution)
    arch = repository_arch(host.get_fact(Arch))
    repo_ops = add_repository(
        ROLE,
        nvidia.repository_key_url,
        CUDA_KEYRING,
        CUDA_SOURCE,
        render(
            "nvidia_driver/cuda.list.j2",
            keyring=CUDA_KEYRING,
            repository=nvidia.repository.rstrip("/"),
            distro=distro,
            arch=arch,
        ),
        # What NVIDIA's cuda-keyring package writes.
        replaces=(f"/etc/apt/sources.list.d/cuda-{distro}-{arch}.list",),
    )
    refresh_lists(
        f"[{ROLE}] Update apt lists after a repository change",
        condition=any_changed(*repo_ops),
    )

    wanted = wanted_packages(nvidia, node)
    installs = apt.packages(
        name=f"[{ROLE}] Install {' '.join(wanted)}",
        packages=wanted,
        no_recommends=False,
        allow_downgrades=bool(nvidia.driver_version),
        # The stack is held (below): an intended version change must be allowed through.
        extra_install_args="--allow-change-held-packages",
    )

    written = {f.path: put_file(f, ROLE) for f in role_plan.files}
    blacklist = written[NOUVEAU_BLACKLIST]
    initramfs = server.shell(
        name=f"[{ROLE}] Rebuild the initramfs without nouveau",
        # No operation rebuilds an initramfs; gated on the blacklist file's change.
        commands=["update-initramfs -u"],
        _if=blacklist.did_change,
    )

    metapackages = [p.split("=")[0] for p in wanted]
    hold_driver_stack(
        name=f"[{ROLE}] Hold {' '.join(metapackages)} and every installed package of branch "
        f"{nvidia.driver_branch}",
        packages=metapackages,
        branch=nvidia.driver_branch,
    )

    module_ops = [op for op in (purged, installs, initramfs) if op is not None]

    def reboot_needed() -> bool:
        return any(op.did_change() for op in module_ops) or reboot_pending(
            host.get_fact(NvidiaKernelModule)
        )

    def running_module_is_current() -> bool:
        return not reboot_needed()

    if nvidia.allow_reboot:
        server.reboot(
            name=f"[{ROLE}] Reboot to load the new NVIDIA kernel module (one node at a time)",
            delay=REBOOT_DELAY_S,
            reboot_timeout=REBOOT_TIMEOUT_S,
            _if=reboot_needed,
            _serial=True,
        )
        ready: Callable[[], bool] = lambda: True  # noqa: E731 - after the reboot it is current
    else:
        python.call(
            name=f"[{ROLE}] Report: reboot required to load the new NVIDIA kernel module",
            function=_reboot_required,
            node=node.name,
            _if=reboot_needed,
        )
        ready = running_module_is_current

    systemd.service(
        name=f"[{ROLE}] Enable and start nvidia-persistenced",
        service="nvidia-persistenced",
        running=True,
        enabled=True,
        _if=ready,
    )
    hgx = node.gpus is not None and node.gpus.nvswitch
    if hgx:
        systemd.service(
            name=f"[{ROLE}] Enable and start nvidia-fabricmanager",
            service="nvidia-fabricmanager",
            running=True,
            enabled=True,
            _if=ready,
        )

    def problems() -> list[str]:
        fabric = host.get_fact(FabricManagerState) if hgx else None
        return gpu_problems(node, nvidia, host.get_fact(NvidiaSmi), fabric) + (
            fabric_version_problems(node, nvidia, host.get_fact(DebPackages)) if hgx else []
        )

    expect(
        name=f"[{ROLE}] Verify GPUs, driver and persistence against the spec",
        what="GPU check",
        problems=problems,
        _if=ready,
    )


def fabric_version_problems(
    node: Node, nvidia: NvidiaStack, installed: Mapping[str, Iterable[str]]
) -> list[str]:
    """The fabric manager must be exactly the driver's version (else it refuses to start)."""
    driver = {upstream_version(v) for v in installed.get(driver_package(nvidia), [])}
    fabric = {upstream_version(v) for v in installed.get(fabricmanager_package(nvidia), [])}
    if driver and fabric and driver != fabric:
        return [
            f"{node.name}: {fabricmanager_package(nvidia)} {', '.join(sorted(fabric))} does not "
            f"match driver {', '.join(sorted(driver))}"
        ]
    return []


__all__ = [
    "apply",
    "expect",
    "gpu_problems",
    "hold_driver_stack",
    "plan",
    "report_lab_skip",
    "require_ubuntu",
    "stale_packages",
]
