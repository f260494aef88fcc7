"""Shared pyinfra steps for roles: put the files a `RolePlan` decided, nothing else."""

from __future__ import annotations

import io

from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from infra.render import HostFile, RolePlan


def put_file(host_file: HostFile, role: str) -> OperationMeta:
    """Upload one planned file; pyinfra compares checksums, so an unchanged file is a no-op."""
    return files.put(
        name=f"[{role}] Write {host_file.path}",
        src=io.StringIO(host_file.content),
        dest=host_file.path,
        mode=host_file.mode,
        user=host_file.user,
        group=host_file.group,
    )


def put_files(plan: RolePlan) -> list[OperationMeta]:
    return [put_file(host_file, plan.role) for host_file in plan.files]
