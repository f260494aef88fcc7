"""pyinfra operations that are left out when the node snapshot shows them already done.

Each helper takes the same arguments as the pyinfra operation it wraps and returns that
operation's `OperationMeta`, or, when `roles._state` shows the node already as wanted, a
completed "no change" meta: follow-ups written as ``_if=op.did_change`` or
``any_changed(...)`` keep working. Without a snapshot the operation is always emitted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pyinfra.api.operation import OperationMeta
from pyinfra.connectors.util import CommandOutput
from pyinfra.operations import apt, files, server, systemd

from roles import _state


def unchanged(name: str) -> OperationMeta:
    """A completed operation that changed nothing, for a step the snapshot shows done."""
    meta = OperationMeta(hash=f"deepfleet-unchanged:{name}", is_change=False)
    meta.set_complete(success=True, commands=[], combined_output=CommandOutput([]))
    return meta


def _wanted(package: str) -> tuple[str, str | None]:
    name, _, version = package.partition("=")
    return name, version or None


def _packages_done(
    packages: Sequence[str], present: bool, installed: Mapping[str, Any] | None = None
) -> bool:
    installed = _state.installed_packages() if installed is None else installed
    for package in packages:
        name, version = _wanted(package)
        versions = installed.get(name)
        if present and (not versions or (version is not None and version not in versions)):
            return False
        if not present and versions:
            return False
    return True


def packages(
    name: str, packages: Sequence[str], present: bool = True, **options: Any
) -> OperationMeta:
    """`apt.packages`; `options` are its install options (no_recommends, allow_downgrades)."""
    if _state.snapshot() is not None and _packages_done(packages, present):
        return unchanged(name)
    return apt.packages(name=name, packages=list(packages), present=present, **options)


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The packages the node does not have (pinned ones: not at that version)."""
    installed = _state.installed_packages()
    return [p for p in packages if not _packages_done([p], True, installed)]


def directory(
    name: str, path: str, mode: str | None = None, user: str | None = None
) -> OperationMeta:
    if _state.directory_matches(path, mode, user):
        return unchanged(name)
    if user is None:
        return files.directory(name=name, path=path, mode=mode)
    return files.directory(name=name, path=path, mode=mode, user=user)


def sysctl(name: str, key: str, value: str | int) -> OperationMeta:
    if _state.sysctl_is(key, str(value)):
        return unchanged(name)
    return server.sysctl(name=name, key=key, value=value)


def service(
    name: str, service: str, running: bool | None = True, enabled: bool | None = True
) -> OperationMeta:
    """Start and/or enable a unit; restarts and reloads stay plain `systemd.service` calls."""
    if _state.unit_is(service, running=running, enabled=enabled):
        return unchanged(name)
    return systemd.service(name=name, service=service, running=running, enabled=enabled)


def hostname(name: str, hostname: str) -> OperationMeta:
    current = _state.snapshot()
    if current is not None and current.hostname == hostname:
        return unchanged(name)
    return server.hostname(name=name, hostname=hostname)


def timezone(name: str, timezone: str) -> OperationMeta:
    current = _state.snapshot()
    if current is not None and current.timezone == timezone:
        return unchanged(name)
    return server.timezone(name=name, timezone=timezone)
