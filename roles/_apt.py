"""Install packages without turning a stale apt cache into drift.

`apt.packages(update=True, cache_time=...)` refreshes the lists whenever they are older than
cache_time, which a dry run reports as a change: a fleet that has not been touched for an hour
would never look converged. Refresh the lists only when a wanted package is missing; emit
nothing at all when the node snapshot shows every package installed.
"""

from __future__ import annotations

from pyinfra.api.operation import OperationMeta
from pyinfra.operations import apt

from roles._converge import missing_packages, packages


def install_packages(name: str, wanted: list[str], role: str) -> OperationMeta:
    missing = missing_packages(wanted)
    if missing:
        apt.update(name=f"[{role}] Update apt lists to install {', '.join(missing)}")
    return packages(name, wanted)
