"""model_storage: the shared store of model weights, and its mount on every GPU node.

- The storage node of an `nfs` store exports it read-only (unless the spec says otherwise) to
  the store's networks only, and gets the model directory layout `<export>/<model path>`.
- GPU nodes mount every store with a systemd `.mount` unit named after the mount point, with
  options for large sequential reads, always read-only: serving never writes weights.
- With `local_cache`, GPU nodes also get a script and a oneshot unit that copy the models they
  serve to local NVMe and verify them against the model's `SHA256SUMS` manifest.
- In the lab (`bind`), the lab itself binds its models directory read-only at the mount point;
  the role only checks that mount and creates nothing.
"""

from __future__ import annotations

import shlex
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

from pyinfra import logger
from pyinfra.api.command import FunctionCommand
from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.facts.files import Directory
from pyinfra.facts.server import KernelVersion, LinuxDistribution
from pyinfra.operations import python, server, systemd
from pyinfra.operations.util import any_changed

from facts.storage import MANIFEST, STATUS_FILE, ModelCache, MountPoint
from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Node, Storage
from roles import _converge as converge
from roles._apt import refresh_lists
from roles._state import Probes
from roles.base import management_address
from roles.nvidia_driver import KEYRING_DIR, add_repository, keyring_directory

ROLE = "model_storage"

EXPORTS_PATH = "/etc/exports.d/deepfleet.exports"
CACHE_SCRIPT = "/usr/local/sbin/deepfleet-model-cache"
UNIT_DIR = "/etc/systemd/system"

# Client options per kind. NFS: NFSv4.2, 1 MiB transfers and 8 TCP connections for large
# sequential reads of weight shards; `hard` so a storage hiccup stalls a read instead of
# handing the inference server an I/O error.
NFS_OPTIONS: tuple[str, ...] = (
    "nfsvers=4.2",
    "rsize=1048576",
    "wsize=1048576",
    "hard",
    "timeo=600",
    "retrans=2",
    "nconnect=8",
)
# EFS speaks NFSv4.1 only; AWS's documented mount options.
EFS_OPTIONS: tuple[str, ...] = (
    "nfsvers=4.1",
    "rsize=1048576",
    "wsize=1048576",
    "hard",
    "timeo=600",
    "retrans=2",
    "noresvport",
)
LUSTRE_OPTIONS: tuple[str, ...] = ("flock", "noatime")
FSTYPES = {"nfs": "nfs", "efs": "nfs4", "fsx-lustre": "lustre"}
CLIENT_PACKAGES = {
    "nfs": ["nfs-common"],
    "efs": ["nfs-common"],
    # From AWS's FSx Lustre client repository (see docs/node-roles.md): the kernel module is
    # built per kernel release, so apply picks the one of the running kernel (lustre_packages).
    "fsx-lustre": ["lustre-client-utils", "lustre-client-modules-$(uname -r)"],
}
# Server side: no write caching across a crash, no subtree checks (a whole-filesystem export
# of one directory tree), root on a client is nobody here.
EXPORT_OPTIONS: tuple[str, ...] = ("sync", "no_subtree_check", "root_squash", "sec=sys")
# Cloud stores whose mount source the spec does not give (`export`) get a source in the
# reserved .invalid domain: it can never mount anything, and `apply` refuses to deploy it.
PENDING_DOMAIN = ".invalid"
LUSTRE_KEYRING = f"{KEYRING_DIR}/fsx-lustre.asc"
LUSTRE_SOURCE = "/etc/apt/sources.list.d/deepfleet-fsx-lustre.list"
# What AWS's install guide writes, naming the same repository with another keyring.
AWS_GUIDE_SOURCE = "/etc/apt/sources.list.d/fsxlustreclientrepo.list"


def systemd_escape_path(path: str) -> str:
    """`systemd-escape --path PATH`: the name systemd requires for a mount unit of PATH."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-"
    out = []
    for index, char in enumerate(trimmed):
        if char == "/":
            out.append("-")
        elif (char.isascii() and char.isalnum()) or char in ":_" or (char == "." and index > 0):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def mount_unit_name(path: str) -> str:
    return systemd_escape_path(path) + ".mount"


def cache_unit_name(storage: Storage) -> str:
    return f"deepfleet-model-cache-{storage.name}.service"


def _unique(options: list[str]) -> list[str]:
    return list(dict.fromkeys(options))


@dataclass(frozen=True)
class Export:
    path: str
    clients: list[str]
    options: list[str]


@dataclass(frozen=True)
class MountSpec:
    storage: Storage
    what: str
    fstype: str
    options: list[str]

    @property
    def where(self) -> str:
        return self.storage.mount_point

    @property
    def unit(self) -> str:
        return mount_unit_name(self.where)

    @property
    def pending(self) -> bool:
        return PENDING_DOMAIN in self.what


def exported_storage(spec: ClusterSpec, node: Node) -> list[Storage]:
    return [s for s in spec.storage if s.kind == "nfs" and s.server == node.name]


def mounted_storage(spec: ClusterSpec, node: Node) -> list[Storage]:
    """Every store is mounted on every GPU node (any of them may serve any model)."""
    return list(spec.storage) if node.in_group("gpu") else []


def server_address(spec: ClusterSpec, storage: Storage) -> str:
    """The NFS server's address on one of the store's networks (where the export allows)."""
    assert storage.server is not None  # the spec requires it for nfs
    server = spec.node(storage.server)
    for address in server.addresses:
        if address.network in storage.networks:
            return str(address.address)
    fallback = management_address(spec, server)
    if fallback is None:
        raise ValueError(f"storage {storage.name}: node {server.name} has no address")
    return fallback


def mount_spec(
    spec: ClusterSpec, storage: Storage, mount_targets: Mapping[str, str] | None = None
) -> MountSpec:
    """How a GPU node mounts `storage`. Cloud stores' sources (FSx/EFS DNS names) exist only
    once Pulumi made them: `mount_targets` is Pulumi's `storage_mount_targets` output."""
    known = (mount_targets or {}).get(storage.name)
    if storage.kind == "nfs":
        what = f"{server_address(spec, storage)}:{storage.export}"
        base = NFS_OPTIONS
    elif storage.kind == "efs":
        what = known or f"{storage.name}.efs{PENDING_DOMAIN}:{storage.export or '/'}"
        base = EFS_OPTIONS
    elif storage.kind == "fsx-lustre":
        what = (
            known
            or f"{storage.name}.fsx{PENDING_DOMAIN}@tcp:{storage.export or '/' + storage.name}"
        )
        base = LUSTRE_OPTIONS
    else:
        raise ValueError(f"storage {storage.name}: kind {storage.kind} is not mounted by a unit")
    options = _unique([*base, *storage.options, "ro"])
    if "rw" in options:
        options.remove("rw")
    return MountSpec(storage, what, FSTYPES[storage.kind], options)


def export_for(spec: ClusterSpec, storage: Storage) -> Export:
    assert storage.export is not None
    access = "ro" if storage.read_only else "rw"
    return Export(
        path=storage.export,
        clients=[str(spec.network(name).cidr) for name in storage.networks],
        options=[access, *EXPORT_OPTIONS],
    )


def cached_models(spec: ClusterSpec, node: Node, storage: Storage) -> list[str]:
    """Model paths on `storage` that this node serves (deployments naming it in a replica)."""
    paths: list[str] = []
    for deployment in spec.deployments:
        if any(node.name in replica for replica in deployment.replicas):
            model = spec.model(deployment.model)
            if model.storage == storage.name and model.path not in paths:
                paths.append(model.path)
    return paths


def models_on(spec: ClusterSpec, storage: Storage) -> list[str]:
    return [m.path for m in spec.models if m.storage == storage.name]


def plan(
    spec: ClusterSpec, node: Node, mount_targets: Mapping[str, str] | None = None
) -> RolePlan | None:
    served = exported_storage(spec, node)
    mounted = mounted_storage(spec, node)
    if not served and not mounted:
        return None
    result = RolePlan(role=ROLE)

    if served:
        exports = [export_for(spec, s) for s in served]
        result.files.append(
            HostFile(EXPORTS_PATH, render("model_storage/deepfleet.exports.j2", exports=exports))
        )
        result.packages.append("nfs-kernel-server")
        result.services.append("nfs-server")
        for storage, export in zip(served, exports, strict=True):
            result.summary.append(
                f"NFS server: exports {export.path} ({export.options[0]}) to "
                f"{', '.join(export.clients)}; model directories: "
                + ", ".join(f"{export.path}/{p}" for p in models_on(spec, storage))
            )

    for storage in mounted:
        if storage.kind == "bind":
            result.summary.append(
                f"lab: the lab binds its models directory read-only at {storage.mount_point}; "
                "checked (present, read-only), nothing created"
            )
            continue
        mount = mount_spec(spec, storage, mount_targets)
        result.files.append(
            HostFile(
                f"{UNIT_DIR}/{mount.unit}",
                render(
                    "model_storage/model-store.mount.j2",
                    storage=storage.name,
                    kind=storage.kind,
                    what=mount.what,
                    where=mount.where,
                    fstype=mount.fstype,
                    options=mount.options,
                ),
            )
        )
        result.packages.extend(p for p in CLIENT_PACKAGES[storage.kind] if p not in result.packages)
        if storage.kind == "fsx-lustre":
            result.summary.append(
                f"Lustre client from {storage.client_repository} <ubuntu codename> main "
                f"({LUSTRE_SOURCE}, key {storage.client_key_url}; Ubuntu only)"
            )
        result.services.append(mount.unit)
        result.summary.append(
            f"mounts {mount.what} at {mount.where} ({mount.fstype}, {','.join(mount.options)})"
        )
        if mount.pending:
            result.summary.append(
                f"PENDING: the {storage.kind} mount source of storage {storage.name} is a Pulumi "
                "output (storage_mount_targets): the deploy refuses to mount it without one"
            )

    for storage in mounted:
        paths = cached_models(spec, node, storage)
        if storage.local_cache is None or not paths:
            continue
        unit = cache_unit_name(storage)
        if not any(f.path == CACHE_SCRIPT for f in result.files):
            script = render(
                "model_storage/deepfleet-model-cache.sh.j2",
                manifest=MANIFEST,
                status_file=STATUS_FILE,
            )
            result.files.append(HostFile(CACHE_SCRIPT, script, mode="755"))
        result.files.append(
            HostFile(
                f"{UNIT_DIR}/{unit}",
                render(
                    "model_storage/model-cache.service.j2",
                    storage=storage.name,
                    unit=unit,
                    script=CACHE_SCRIPT,
                    source_root=storage.mount_point,
                    cache_root=storage.local_cache,
                    model_paths=paths,
                ),
            )
        )
        if "rsync" not in result.packages:
            result.packages.append("rsync")
        result.services.append(unit)
        result.summary.append(
            f"local cache {storage.local_cache}: {', '.join(paths)} copied and verified "
            f"against {MANIFEST} by {unit}"
        )

    if not result.files:
        result.skipped = "lab: model storage is the lab's read-only bind mount (checked only)"
    return result


# --- verification steps: read facts at execution time, change nothing ----------------------


def ubuntu_codename(node: str, distribution: Mapping[str, Any]) -> str:
    """The Ubuntu release's codename (jammy, noble): the suite of AWS's Lustre client
    repository, which has packages for Ubuntu only."""
    meta = distribution.get("release_meta") or {}
    codename = meta.get("VERSION_CODENAME") or meta.get("UBUNTU_CODENAME")
    if str(distribution.get("name") or "").lower() == "ubuntu" and codename:
        return str(codename)
    release = meta.get("PRETTY_NAME") or distribution.get("name")
    raise DeployError(
        f"{node}: fsx-lustre storage needs AWS's Lustre client, packaged for Ubuntu only in an "
        f"apt repository; this node runs {release}. Use Ubuntu 22.04 or 24.04 on nodes that "
        "mount FSx for Lustre, or mount it by hand and use another storage kind in the spec."
    )


def lustre_source(storage: Storage, codename: str) -> str:
    return (
        f"# Managed by deepfleet (role {ROLE}): AWS's FSx for Lustre client repository.\n"
        f"deb [signed-by={LUSTRE_KEYRING}] {storage.client_repository.rstrip('/')} "
        f"{codename} main\n"
    )


def lustre_packages(kernel: str) -> list[str]:
    """AWS builds the Lustre module per kernel release: the running kernel's, and on Ubuntu's
    -aws kernels also the meta package that follows that flavour through kernel upgrades (on
    another flavour it would pull in the -aws kernel)."""
    packages = ["lustre-client-utils", f"lustre-client-modules-{kernel}"]
    if kernel.endswith("-aws"):
        packages.append("lustre-client-modules-aws")
    return packages


def _lustre_repository(node: Node, storage: Storage, packages: list[str]) -> None:
    codename = ubuntu_codename(node.name, host.get_fact(LinuxDistribution))
    keyring_directory(ROLE)
    changed = add_repository(
        ROLE,
        storage.client_key_url,
        LUSTRE_KEYRING,
        LUSTRE_SOURCE,
        lustre_source(storage, codename),
        replaces=(AWS_GUIDE_SOURCE,),
    )
    module = packages[1]
    missing = bool(converge.missing_packages([module]))
    # Also when the module is missing: after a kernel upgrade the lists may predate its module.
    refresh_lists(
        f"[{ROLE}] Update apt lists (repository changed or kernel module missing)",
        condition=lambda: missing or any_changed(*changed)(),
    )
    if missing:
        # apt's own "Unable to locate package" would not say why or what to do.
        why = (
            f"{node.name}: {storage.client_repository} has no {module} for the running kernel: "
            "boot a kernel the repository has a module for (apt-cache search "
            "lustre-client-modules) or wait until AWS publishes one"
        )
        server.shell(
            name=f"[{ROLE}] Check the Lustre repository has a module for the running kernel",
            commands=[
                f"apt-cache show --no-all-versions {shlex.quote(module)} >/dev/null 2>&1 "
                f"|| {{ echo {shlex.quote(why)} >&2; exit 1; }}"
            ],
        )


def _fail(state: Any, host: Any, message: str) -> bool:
    # FunctionCommand passes state and host to a callback that names both arguments.
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


def bind_mount_problem(state: Any, node_name: str, path: str) -> str | None:
    """Pure: what is wrong with the lab's bind mount (a `MountState` or None), if anything."""
    if state is None:
        return (
            f"{node_name}: nothing is mounted at {path}: the lab binds its models directory "
            "there (`deepfleet lab up`); re-create the lab"
        )
    if not state.read_only:
        return f"{node_name}: {path} is mounted read-write ({state.source}); it must be read-only"
    return None


@operation(is_idempotent=True)
def read_only_mount_present(node_name: str, path: str) -> Generator[FunctionCommand, None, None]:
    """Fail unless `path` is a read-only mount point on the node."""
    if not host.state.is_executing:
        host.noop(f"{path} is checked when the deploy runs")
        return
    problem = bind_mount_problem(host.get_fact(MountPoint, path=path), node_name, path)
    if problem is None:
        host.noop(f"{path} is mounted read-only")
        return
    yield FunctionCommand(_fail, (problem,), {})


@operation(is_idempotent=True)
def report_models(
    node_name: str, mount_point: str, model_paths: list[str], cache_dir: str | None
) -> Generator[FunctionCommand, None, None]:
    """Report which model directories the store holds and, with a cache, the cached copies'
    manifest status. Weights may be loaded after the deploy: this reports, never fails."""
    if not host.state.is_executing:
        host.noop("model directories are reported when the deploy runs")
        return
    missing = [
        p for p in model_paths if host.get_fact(Directory, path=f"{mount_point}/{p}") is None
    ]
    lines = [
        f"{node_name}: {mount_point}: "
        + (f"missing {', '.join(missing)}" if missing else f"{len(model_paths)} model(s) present")
    ]
    if cache_dir is not None:
        statuses = host.get_fact(
            ModelCache, source_dir=mount_point, cache_dir=cache_dir, model_paths=model_paths
        )
        lines += [f"{node_name}: cache {status.describe()}" for status in statuses]
    for line in lines:
        host.log_styled(line, fg="yellow" if missing else "cyan", log_func=logger.info)
    host.noop("; ".join(lines))
    return
    yield  # a generator that yields nothing: the report changes nothing


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(units=("nfs-server.service",))


@deploy("model_storage")
def apply(spec: ClusterSpec, node: Node) -> None:
    from roles._files import put_file

    # Pulumi's saved `storage_mount_targets` output, as inventory host data (cloud stores only).
    mount_targets: Mapping[str, str] | None = host.data.get("storage_mount_targets")
    desired = plan(spec, node, mount_targets)
    if desired is None:
        return
    files_by_path = {f.path: f for f in desired.files}

    for storage in exported_storage(spec, node):
        converge.packages(name=f"[{ROLE}] Install the NFS server", packages=["nfs-kernel-server"])
        assert storage.export is not None
        converge.directory(
            name=f"[{ROLE}] Create the export {storage.export}",
            path=storage.export,
            mode="755",
        )
        for path in models_on(spec, storage):
            converge.directory(
                name=f"[{ROLE}] Create the model directory {storage.export}/{path}",
                path=f"{storage.export}/{path}",
                mode="755",
            )
    if EXPORTS_PATH in files_by_path:
        exports_op = put_file(files_by_path[EXPORTS_PATH], ROLE)
        converge.service(
            name=f"[{ROLE}] Start and enable the NFS server",
            service="nfs-server.service",
            running=True,
            enabled=True,
        )
        # nfs-server's reload is `exportfs -r`: clients keep their mounts.
        systemd.service(
            name=f"[{ROLE}] Re-export after the exports changed",
            service="nfs-server.service",
            reloaded=True,
            _if=exports_op.did_change,
        )

    for storage in mounted_storage(spec, node):
        if storage.kind == "bind":
            read_only_mount_present(
                name=f"[{ROLE}] Check the lab's read-only model mount {storage.mount_point}",
                node_name=node.name,
                path=storage.mount_point,
            )
            report_models(
                name=f"[{ROLE}] Report the model directories under {storage.mount_point}",
                node_name=node.name,
                mount_point=storage.mount_point,
                model_paths=models_on(spec, storage),
                cache_dir=None,
            )
            continue
        mount = mount_spec(spec, storage, mount_targets)
        if mount.pending:
            python.call(
                name=f"[{ROLE}] Refuse to mount {storage.name} without a mount source",
                function=_fail,
                message=(
                    f"{node.name}: no mount source for storage {storage.name} "
                    f"({storage.kind}): save `pulumi stack output --json` and set "
                    "DEEPFLEET_OUTPUTS so the inventory passes storage_mount_targets"
                ),
            )
            continue
        packages = CLIENT_PACKAGES[storage.kind]
        if storage.kind == "fsx-lustre":
            packages = lustre_packages(host.get_fact(KernelVersion))
            _lustre_repository(node, storage, packages)
        converge.packages(
            name=f"[{ROLE}] Install the {storage.kind} client",
            packages=packages,
        )
        unit_op = put_file(files_by_path[f"{UNIT_DIR}/{mount.unit}"], ROLE)
        systemd.daemon_reload(
            name=f"[{ROLE}] Reload systemd after {mount.unit} changed", _if=unit_op.did_change
        )
        # Started, never restarted: unmounting under a running inference server fails.
        converge.service(
            name=f"[{ROLE}] Mount {storage.mount_point} and mount it at boot",
            service=mount.unit,
            running=True,
            enabled=True,
        )

        cache_unit = cache_unit_name(storage)
        cache_file = files_by_path.get(f"{UNIT_DIR}/{cache_unit}")
        paths = cached_models(spec, node, storage)
        if cache_file is not None and storage.local_cache is not None:
            converge.packages(
                name=f"[{ROLE}] Install rsync for the model cache", packages=["rsync"]
            )
            converge.directory(
                name=f"[{ROLE}] Create the model cache {storage.local_cache}",
                path=storage.local_cache,
                mode="755",
            )
            script_op = put_file(files_by_path[CACHE_SCRIPT], ROLE)
            cache_op = put_file(cache_file, ROLE)
            systemd.daemon_reload(
                name=f"[{ROLE}] Reload systemd after {cache_unit} changed",
                _if=cache_op.did_change,
            )
            converge.service(
                name=f"[{ROLE}] Enable {cache_unit} at boot",
                service=cache_unit,
                running=None,
                enabled=True,
            )
            # No operation starts a unit without waiting for it, and a 700 GB copy must not
            # hold the deploy: start it in the background, only when its files changed (the
            # script skips copies already verified, so a repeated start is harmless).
            systemd.service(
                name=f"[{ROLE}] Start {cache_unit} in the background",
                service=cache_unit,
                running=None,
                command="start --no-block",
                _if=any_changed(script_op, cache_op),
            )
        report_models(
            name=f"[{ROLE}] Report the model directories under {storage.mount_point}",
            node_name=node.name,
            mount_point=storage.mount_point,
            model_paths=models_on(spec, storage),
            cache_dir=storage.local_cache if paths else None,
        )
