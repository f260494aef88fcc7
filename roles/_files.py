"""Shared pyinfra steps for roles: put the files a `RolePlan` decided, nothing else."""

from __future__ import annotations

import io

from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from infra.render import HostFile, RolePlan
from roles import _state
from roles._converge import unchanged


def put_file(host_file: HostFile, role: str, name: str | None = None) -> OperationMeta:
    """Upload one planned file, unless the node snapshot shows it byte for byte as planned
    (with its mode and owner); pyinfra then compares checksums again when it runs.

    `name` replaces the usual "[role] Write /path", which drift reads as a diffable file."""
    name = name or f"[{role}] Write {host_file.path}"
    if _state.file_matches(
        host_file.path,
        host_file.content.encode(),
        host_file.mode,
        host_file.user,
        host_file.group,
    ):
        return unchanged(name)
    return files.put(
        name=name,
        src=io.StringIO(host_file.content),
        dest=host_file.path,
        mode=host_file.mode,
        user=host_file.user,
        group=host_file.group,
    )


def put_files(plan: RolePlan) -> list[OperationMeta]:
    return [put_file(host_file, plan.role) for host_file in plan.files]
