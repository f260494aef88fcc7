"""Refresh apt lists and install packages without hanging a deploy or inventing drift.

- `apt.packages(update=True, cache_time=...)` refreshes the lists whenever they are older than
  cache_time, which a dry run reports as a change: a fleet that has not been touched for an
  hour would never look converged. Lists are refreshed only when a wanted package is missing;
  nothing at all is emitted when the node snapshot shows every package installed.
- `apt-get update` can wait forever: through apt-cacher-ng, with many nodes refreshing at once,
  apt-get and its http and gpgv methods were seen idle, waiting on each other, for hours
  (docs/lab.md). Each refresh runs under `timeout` (which releases the lists lock) and is
  retried, so a stall costs minutes and then fails the host with a clear name, never the run.
"""

from __future__ import annotations

from collections.abc import Callable

from pyinfra.api.operation import OperationMeta
from pyinfra.operations import server

from roles._converge import missing_packages, packages

UPDATE_TIMEOUT_S = 600  # a slow mirror fetching every index of a release
LAB_UPDATE_TIMEOUT_S = 90  # lab nodes read indexes from the warm cache in seconds
UPDATE_RETRIES = 2


def refresh_lists(
    name: str,
    timeout_s: int = UPDATE_TIMEOUT_S,
    condition: Callable[[], bool] | None = None,
    one_host_at_a_time: bool = False,
) -> OperationMeta:
    """`one_host_at_a_time`: for nodes behind apt-cacher-ng (the lab), which refetches every
    InRelease from the mirror for each client and races when several ask at once."""
    extra: dict[str, object] = {} if condition is None else {"_if": condition}
    if one_host_at_a_time:
        extra["_parallel"] = 1
    return server.shell(
        name=name,
        commands=[f"timeout --kill-after=10 {timeout_s} apt-get update"],
        _retries=UPDATE_RETRIES,
        _retry_delay=5,
        **extra,
    )


def install_packages(
    name: str,
    wanted: list[str],
    role: str,
    update_timeout_s: int = UPDATE_TIMEOUT_S,
    refreshed: Callable[[], bool] | None = None,
    one_host_at_a_time: bool = False,
) -> OperationMeta:
    """`refreshed`: true when an earlier step of this run already refreshed the lists."""
    missing = missing_packages(wanted)
    if missing:
        refresh_lists(
            f"[{role}] Update apt lists to install {', '.join(missing)}",
            update_timeout_s,
            None if refreshed is None else (lambda: not refreshed()),
            one_host_at_a_time,
        )
    return packages(name, wanted)
