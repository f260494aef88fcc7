"""timesync: every node on one time (chrony by default, systemd-timesyncd on request).

chrony reads the spec's servers and pools; nodes named in `site.ntp.serve_from` also answer NTP
for the cluster's networks and keep serving their own clock (`local stratum 10`) when no
upstream answers, and every other node uses them as an extra source. After the service runs,
a verification step reads `chronyc -c tracking` (facts.chrony.ChronyTracking) and reports it;
on real hosts an unsynchronised clock fails the deploy naming the node. Under timesyncd the
same step reads `timedatectl` (facts.chrony.TimesyncdStatus).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from pyinfra import logger
from pyinfra.api.command import FunctionCommand
from pyinfra.api.deploy import deploy
from pyinfra.api.operation import operation
from pyinfra.context import host
from pyinfra.operations import systemd
from pyinfra.operations.util import any_changed

from facts.chrony import ChronyTracking, TimesyncdStatus, TimesyncStatus, Tracking
from infra.render import HostFile, RolePlan, render
from infra.spec import ClusterSpec, Node
from roles import _converge as converge
from roles._state import Probes
from roles.base import management_address

ROLE = "timesync"

CHRONY_CONF = "/etc/chrony/chrony.conf"
CHRONY_LAB_DROPIN = "/etc/systemd/system/chrony.service.d/10-deepfleet-lab.conf"
TIMESYNCD_CONF = "/etc/systemd/timesyncd.conf.d/90-deepfleet.conf"
# Networks whose hosts may ask a serving node for time: the cluster's own, never the public one.
SERVED_PURPOSES = ("management", "storage", "rdma", "serving")
# chrony steps or slews within seconds of a restart (iburst); give it this long before judging.
VERIFY_RETRIES = 6
VERIFY_RETRY_DELAY_S = 5


def serves_time(spec: ClusterSpec, node: Node) -> bool:
    return spec.site.ntp.implementation == "chrony" and node.name in spec.site.ntp.serve_from


def node_addresses(node: Node) -> set[str]:
    found = {str(a.address) for a in node.addresses}
    if node.address is not None:
        found.add(str(node.address))
    return found


def cluster_servers(spec: ClusterSpec, node: Node) -> list[str]:
    """The serve_from nodes' management addresses, as extra sources for every other node."""
    servers = []
    for name in spec.site.ntp.serve_from:
        if name == node.name:
            continue
        address = management_address(spec, spec.node(name))
        if address is not None and address not in spec.site.ntp.servers:
            servers.append(address)
    return servers


def chrony_sources(spec: ClusterSpec, node: Node) -> list[str]:
    """The spec's servers minus the node's own addresses (a node never polls itself)."""
    own = node_addresses(node)
    return [s for s in spec.site.ntp.servers if s not in own]


def plan(spec: ClusterSpec, node: Node) -> RolePlan:
    ntp = spec.site.ntp
    if ntp.implementation == "timesyncd":
        sources = [*ntp.servers, *ntp.pools]
        result = RolePlan(role=ROLE, packages=["systemd-timesyncd"], services=["systemd-timesyncd"])
        result.files.append(
            HostFile(TIMESYNCD_CONF, render("timesync/timesyncd.conf.j2", sources=sources))
        )
        result.summary.append(f"systemd-timesyncd from {', '.join(sources)}; chrony removed")
        if node.name in ntp.serve_from:
            result.summary.append("timesyncd is client-only: this node does not serve time")
        if spec.is_lab:
            result.summary.append(
                "lab: timesyncd does not run in a container (ConditionVirtualization, no "
                "CAP_SYS_TIME); the file is written, the service is not started"
            )
        else:
            result.summary.append(
                "verify: timedatectl must report NTP on and the clock synchronised, else the "
                "deploy fails"
            )
        return result

    serving = serves_time(spec, node)
    servers = chrony_sources(spec, node)
    extra = cluster_servers(spec, node)
    allow = [str(n.cidr) for n in spec.networks if n.purpose in SERVED_PURPOSES] if serving else []
    result = RolePlan(role=ROLE, packages=["chrony"], services=["chrony"])
    result.files.append(
        HostFile(
            CHRONY_CONF,
            render(
                "timesync/chrony.conf.j2",
                servers=servers,
                pools=ntp.pools,
                cluster_servers=extra,
                makestep_seconds=ntp.makestep_seconds,
                makestep_limit=ntp.makestep_limit,
                allow=allow,
            ),
        )
    )
    sources = [*servers, *ntp.pools, *extra]
    result.summary.append(
        f"chrony from {', '.join(sources) if sources else 'its own clock only'}; "
        "systemd-timesyncd removed"
    )
    if serving:
        result.summary.append(f"serves time to {', '.join(allow)} (local stratum 10)")
    if spec.is_lab:
        result.files.append(HostFile(CHRONY_LAB_DROPIN, render("timesync/chrony-lab.conf.j2")))
        result.summary.append(
            "lab: chronyd -x via a drop-in (no CAP_SYS_TIME); offsets reported, never fatal"
        )
    else:
        result.summary.append(
            "verify: chronyc tracking must be synchronised, else the deploy fails"
        )
    return result


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str


def tracking_verdict(tracking: Tracking | None, node_name: str, enforce: bool) -> Verdict:
    """Judge chronyd's tracking report. Pure: `enforce` is False in the lab, where the clock
    is the build host's and offsets mean nothing."""
    if tracking is None:
        message = f"{node_name}: chronyd did not answer `chronyc tracking`"
        hint = " - check `systemctl status chrony` on the node"
        return Verdict(not enforce, message + (hint if enforce else " (lab: not enforced)"))
    message = f"{node_name}: chrony {tracking.describe()}"
    if not tracking.synchronised:
        hint = (
            " - check `chronyc sources -v` on the node and that UDP 123 reaches the servers "
            "named in site.ntp"
        )
        return Verdict(not enforce, message + (hint if enforce else " (lab: not enforced)"))
    if tracking.local_clock and enforce:
        message += " - WARNING: no upstream source reachable, serving its own clock"
    return Verdict(True, message)


def _fail(state: Any, host: Any, message: str) -> bool:
    # FunctionCommand passes state and host to a callback that names both arguments.
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


def timesyncd_verdict(status: TimesyncStatus | None, node_name: str, enforce: bool) -> Verdict:
    """Judge timedatectl's report under systemd-timesyncd, as `tracking_verdict` does chrony's."""
    if status is None:
        message = f"{node_name}: timedatectl did not answer"
        hint = " - check `systemctl status systemd-timedated systemd-timesyncd` on the node"
        return Verdict(not enforce, message + (hint if enforce else " (lab: not enforced)"))
    message = f"{node_name}: systemd-timesyncd {status.describe()}"
    if status.ntp_enabled and status.synchronised and status.answered:
        return Verdict(True, message)
    hint = (
        " - run `timedatectl set-ntp true`"
        if not status.ntp_enabled
        else " - systemd-timesyncd is not running (`systemctl status systemd-timesyncd`)"
        if status.answered is None
        else " - check `timedatectl timesync-status` on the node and that UDP 123 reaches the "
        "servers named in site.ntp"
    )
    return Verdict(not enforce, message + (hint if enforce else " (lab: not enforced)"))


@operation(is_idempotent=True)
def clock_synchronised(
    node_name: str, enforce: bool, daemon: str
) -> Generator[FunctionCommand, None, None]:
    """Read the time daemon's report once it runs (chrony: `chronyc tracking`; timesyncd:
    `timedatectl`); report it, and fail when `enforce` and the clock is not synchronised.
    Changes nothing, so a no-op deploy stays a no-op."""
    if not host.state.is_executing:
        host.noop(f"{daemon} is checked after it runs")
        return
    if daemon == "chrony":
        verdict = tracking_verdict(host.get_fact(ChronyTracking), node_name, enforce)
    else:
        verdict = timesyncd_verdict(host.get_fact(TimesyncdStatus), node_name, enforce)
    if verdict.ok:
        host.log_styled(verdict.message, fg="cyan", log_func=logger.info)
        host.noop(verdict.message)
        return
    yield FunctionCommand(_fail, (verdict.message,), {})


def snapshot_probes(spec: ClusterSpec, node: Node) -> Probes:
    return Probes(units=("chrony.service", "systemd-timesyncd.service"))


@deploy("timesync")
def apply(spec: ClusterSpec, node: Node) -> None:
    from roles._files import put_files

    desired = plan(spec, node)
    if spec.site.ntp.implementation == "timesyncd":
        converge.packages(name=f"[{ROLE}] Remove chrony", packages=["chrony"], present=False)
        converge.packages(name=f"[{ROLE}] Install systemd-timesyncd", packages=desired.packages)
        written = put_files(desired)
        if spec.is_lab:
            return
        converge.service(
            name=f"[{ROLE}] Start and enable systemd-timesyncd",
            service="systemd-timesyncd.service",
            running=True,
            enabled=True,
        )
        systemd.service(
            name=f"[{ROLE}] Restart systemd-timesyncd after its configuration changed",
            service="systemd-timesyncd.service",
            restarted=True,
            _if=any_changed(*written),
        )
        clock_synchronised(
            name=f"[{ROLE}] Verify systemd-timesyncd is synchronised",
            node_name=node.name,
            daemon="systemd-timesyncd",
            enforce=True,
            _retries=VERIFY_RETRIES,
            _retry_delay=VERIFY_RETRY_DELAY_S,
        )
        return

    # Installing chrony removes systemd-timesyncd (both provide time-daemon); say it anyway.
    converge.packages(name=f"[{ROLE}] Install chrony", packages=desired.packages)
    converge.packages(
        name=f"[{ROLE}] Remove systemd-timesyncd", packages=["systemd-timesyncd"], present=False
    )
    written = put_files(desired)
    dropins = [
        op for f, op in zip(desired.files, written, strict=True) if f.path == CHRONY_LAB_DROPIN
    ]
    if dropins:
        systemd.daemon_reload(
            name=f"[{ROLE}] Reload systemd after the chrony drop-in changed",
            _if=any_changed(*dropins),
        )
    converge.service(
        name=f"[{ROLE}] Start and enable chrony",
        service="chrony.service",
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"[{ROLE}] Restart chrony after its configuration changed",
        service="chrony.service",
        restarted=True,
        _if=any_changed(*written),
    )
    clock_synchronised(
        name=f"[{ROLE}] Verify chrony is synchronised",
        node_name=node.name,
        daemon="chrony",
        enforce=not spec.is_lab,
        _retries=0 if spec.is_lab else VERIFY_RETRIES,
        _retry_delay=VERIFY_RETRY_DELAY_S,
    )
