"""Install packages without turning a stale apt cache into drift.

`apt.packages(update=True, cache_time=...)` refreshes the lists whenever they are older than
cache_time, which a dry run reports as a change: a fleet that has not been touched for an hour
would never look converged. Refresh the lists only when a wanted package is missing.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt


def install_packages(name: str, packages: list[str], role: str) -> None:
    installed = host.get_fact(DebPackages) or {}
    missing = [p for p in packages if p.split("=", 1)[0] not in installed]
    if missing:
        apt.update(name=f"[{role}] Update apt lists to install {', '.join(missing)}")
    apt.packages(name=name, packages=packages)
