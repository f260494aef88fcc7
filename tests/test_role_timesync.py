"""timesync role: chrony.conf per node, the lab drop-in, timesyncd, and the sync verdict."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from facts.chrony import ChronyTracking, TimesyncdStatus, TimesyncStatus, Tracking
from infra.render import HostFile, RolePlan
from infra.spec import ClusterSpec, load_spec
from infra.validators import ConfigRejected, check_chrony
from roles import timesync
from tests.conftest import EXAMPLE_SPECS, HOSTS

BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
AWS = load_spec(HOSTS / "example-aws.yaml")
LAB = load_spec(HOSTS / "lab.yaml")
FIXTURES = Path(__file__).parent / "fixtures" / "facts"


def _spec(path: Path, **ntp: Any) -> ClusterSpec:
    data = yaml.safe_load(path.read_text())
    data["site"].setdefault("ntp", {}).update(ntp)
    return ClusterSpec.model_validate(data)


def _file(plan: RolePlan, path: str) -> str:
    return next(f.content for f in plan.files if f.path == path)


def _directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def systemd_verify(files: list[HostFile], *units: str) -> None:
    """`systemd-analyze verify` with the files as the first unit directory; stderr = failure.

    For what infra.validators.check_systemd_units cannot take: a drop-in (it verifies every
    file it gets as a unit) and a unit whose ExecStart is a program the role itself writes.
    Putting the files first on SYSTEMD_UNIT_PATH (a trailing ':' keeps the default
    directories) verifies the named units with the drop-ins applied, against this machine's
    own units and programs (Debian's chrony.service and /usr/sbin/chronyd here).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze (systemd)")
    with tempfile.TemporaryDirectory() as directory:
        for host_file in files:
            relative = Path(host_file.path).relative_to("/etc/systemd/system")
            target = Path(directory) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(host_file.content)
        names = list(units) or [
            str(Path(directory) / Path(f.path).relative_to("/etc/systemd/system"))
            for f in files
            if not f.path.endswith(".conf")
        ]
        result = subprocess.run(
            [analyze, "verify", "--man=no", *names],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"},
        )
        if result.returncode != 0 or result.stderr.strip():
            paths = ", ".join(f.path for f in files)
            raise ConfigRejected("systemd-analyze verify", paths, result.stdout + result.stderr)


# --- chrony.conf ---------------------------------------------------------------------------


def test_clients_use_the_pools_and_the_cluster_time_server() -> None:
    conf = _file(timesync.plan(BAREMETAL, BAREMETAL.node("gpu-01")), timesync.CHRONY_CONF)
    assert _directives(conf) == [
        "pool ntp.aliyun.com iburst maxsources 4",
        "pool cn.pool.ntp.org iburst maxsources 4",
        "server 192.0.2.30 iburst",
        "makestep 1.0 3",
        "driftfile /var/lib/chrony/chrony.drift",
        "rtcsync",
        "maxupdateskew 100.0",
        "logdir /var/log/chrony",
    ]


def test_serving_node_allows_the_cluster_networks_and_keeps_local_time() -> None:
    conf = _file(timesync.plan(BAREMETAL, BAREMETAL.node("storage-01")), timesync.CHRONY_CONF)
    lines = _directives(conf)
    assert "server 192.0.2.30 iburst" not in lines  # never polls itself
    # mgmt, storage and bmc networks; never the public one.
    assert [line for line in lines if line.startswith("allow")] == [
        "allow 192.0.2.0/24",
        "allow 198.51.100.0/24",
        "allow 203.0.113.128/25",
    ]
    assert lines[-1] == "local stratum 10"


def test_lab_nodes_follow_the_infra_node_which_serves_its_own_clock() -> None:
    gpu = _directives(_file(timesync.plan(LAB, LAB.node("gpu-01")), timesync.CHRONY_CONF))
    assert [line for line in gpu if line.startswith(("server", "pool"))] == [
        "server 10.77.0.20 iburst"
    ]
    infra = _directives(_file(timesync.plan(LAB, LAB.node("infra-01")), timesync.CHRONY_CONF))
    assert not [line for line in infra if line.startswith(("server", "pool"))]
    assert "allow 10.77.0.0/24" in infra and "local stratum 10" in infra


def test_aws_uses_the_time_sync_service_and_serves_nobody() -> None:
    lines = _directives(_file(timesync.plan(AWS, AWS.node("gpu-01")), timesync.CHRONY_CONF))
    assert lines[0] == "server 169.254.169.123 iburst"
    assert not any(line.startswith(("allow", "local")) for line in lines)


def test_makestep_comes_from_the_spec() -> None:
    spec = _spec(HOSTS / "example-aws.yaml", makestep_seconds=0.5, makestep_limit=-1)
    conf = _file(timesync.plan(spec, spec.node("gpu-01")), timesync.CHRONY_CONF)
    assert "makestep 0.5 -1" in conf.splitlines()


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_chronyd_accepts_every_rendered_chrony_conf(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for node in spec.nodes:
        plan = timesync.plan(spec, node)
        check_chrony(next(f for f in plan.files if f.path == timesync.CHRONY_CONF))


@pytest.mark.validators
def test_chronyd_rejects_a_bad_directive() -> None:
    good = _file(timesync.plan(BAREMETAL, BAREMETAL.node("storage-01")), timesync.CHRONY_CONF)
    bad = HostFile(timesync.CHRONY_CONF, good.replace("local stratum 10", "local stratum ten"))
    with pytest.raises(ConfigRejected, match="chronyd"):
        check_chrony(bad)
    typo = HostFile(timesync.CHRONY_CONF, good + "alow 10.0.0.0/8\n")
    with pytest.raises(ConfigRejected):
        check_chrony(typo)


# --- the lab drop-in -----------------------------------------------------------------------


def test_lab_drop_in_only_in_the_lab() -> None:
    assert timesync.CHRONY_LAB_DROPIN not in {
        f.path for f in timesync.plan(BAREMETAL, BAREMETAL.node("gpu-01")).files
    }
    dropin = _file(timesync.plan(LAB, LAB.node("gpu-01")), timesync.CHRONY_LAB_DROPIN)
    assert _directives(dropin) == [
        "[Unit]",
        "ConditionCapability=",
        "[Service]",
        "ExecStart=",
        "ExecStart=!/usr/sbin/chronyd $DAEMON_OPTS -x",
    ]


needs_chrony_unit = pytest.mark.skipif(
    not Path("/lib/systemd/system/chrony.service").exists(),
    reason="needs Debian's chrony package (its chrony.service is what the drop-in changes)",
)


@pytest.mark.validators
@needs_chrony_unit
def test_systemd_accepts_the_lab_drop_in_on_debians_chrony_service() -> None:
    dropin = next(
        f
        for f in timesync.plan(LAB, LAB.node("gpu-01")).files
        if f.path.endswith(".conf") and f.path.startswith("/etc/systemd/")
    )
    systemd_verify([dropin], "chrony.service")


@pytest.mark.validators
@needs_chrony_unit
def test_systemd_rejects_a_misspelt_drop_in() -> None:
    good = _file(timesync.plan(LAB, LAB.node("gpu-01")), timesync.CHRONY_LAB_DROPIN)
    bad = HostFile(
        timesync.CHRONY_LAB_DROPIN, good.replace("ConditionCapability=", "ConditonCapability=")
    )
    with pytest.raises(ConfigRejected, match="Unknown key"):
        systemd_verify([bad], "chrony.service")


# --- timesyncd -----------------------------------------------------------------------------


def test_timesyncd_when_asked() -> None:
    spec = _spec(HOSTS / "example-baremetal.yaml", implementation="timesyncd", serve_from=[])
    plan = timesync.plan(spec, spec.node("gpu-01"))
    assert plan.packages == ["systemd-timesyncd"]
    assert [f.path for f in plan.files] == [timesync.TIMESYNCD_CONF]
    assert _directives(plan.files[0].content) == [
        "[Time]",
        "NTP=ntp.aliyun.com cn.pool.ntp.org",
        "FallbackNTP=",
    ]


def test_timesyncd_conf_is_an_ini_file_systemd_reads() -> None:
    import configparser

    spec = _spec(HOSTS / "example-aws.yaml", implementation="timesyncd")
    text = timesync.plan(spec, spec.node("gpu-01")).files[0].content
    parser = configparser.ConfigParser()
    parser.read_string(text)
    assert parser["Time"]["NTP"] == "169.254.169.123"


# --- verification --------------------------------------------------------------------------


def _tracking(name: str) -> Tracking | None:
    return ChronyTracking().process((FIXTURES / name).read_text().splitlines())


def test_unsynchronised_production_node_fails_naming_the_node() -> None:
    verdict = timesync.tracking_verdict(
        _tracking("chronyc-tracking-unsynchronised.csv"), "gpu-02", enforce=True
    )
    assert not verdict.ok
    assert verdict.message.startswith("gpu-02: chrony not synchronised (stratum 0")
    assert "chronyc sources -v" in verdict.message


def test_unsynchronised_lab_node_is_reported_not_failed() -> None:
    verdict = timesync.tracking_verdict(
        _tracking("chronyc-tracking-unsynchronised.csv"), "gpu-02", enforce=False
    )
    assert verdict.ok and "lab: not enforced" in verdict.message


def test_synchronised_node_passes_with_its_offset() -> None:
    verdict = timesync.tracking_verdict(
        _tracking("chronyc-tracking-synchronised.csv"), "gpu-01", enforce=True
    )
    assert verdict.ok
    assert verdict.message == (
        "gpu-01: chrony synchronised to 127.0.0.1, stratum 11, offset +0.002 ms, leap status Normal"
    )


def test_serving_its_own_clock_passes_with_a_warning() -> None:
    verdict = timesync.tracking_verdict(
        _tracking("chronyc-tracking-local-stratum.csv"), "storage-01", enforce=True
    )
    assert verdict.ok and "WARNING: no upstream" in verdict.message


def test_silent_chronyd_fails_in_production_only() -> None:
    assert not timesync.tracking_verdict(None, "lb-01", enforce=True).ok
    assert timesync.tracking_verdict(None, "lb-01", enforce=False).ok


@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_every_node_gets_timesync(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for node in spec.nodes:
        plan = timesync.plan(spec, node)
        assert plan.role == "timesync" and plan.packages == ["chrony"]
        assert plan.services == ["chrony"]


def _timesync(name: str) -> TimesyncStatus | None:
    return TimesyncdStatus().process((FIXTURES / name).read_text().splitlines())


def test_timesyncd_verdicts() -> None:
    synced = timesync.timesyncd_verdict(_timesync("timedatectl-synchronised.txt"), "gpu-01", True)
    assert synced == timesync.Verdict(
        True, "gpu-01: systemd-timesyncd synchronised, server ntp.example.internal (192.0.2.5)"
    )
    waiting = timesync.timesyncd_verdict(
        _timesync("timedatectl-unsynchronised.txt"), "gpu-01", True
    )
    assert not waiting.ok and "UDP 123 reaches the servers named in site.ntp" in waiting.message
    stale = timesync.timesyncd_verdict(_timesync("timedatectl-stale.txt"), "gpu-01", True)
    assert not stale.ok and "no NTP reply since timesyncd started" in stale.message
    off = timesync.timesyncd_verdict(_timesync("timedatectl-ntp-off.txt"), "gpu-01", True)
    assert not off.ok and off.message.endswith("run `timedatectl set-ntp true`")
    # The kernel still says synchronised (chrony's last sync), but timesyncd says nothing.
    silent = TimesyncdStatus().process(["NTP=yes", "NTPSynchronized=yes"])
    quiet = timesync.timesyncd_verdict(silent, "gpu-01", True)
    assert not quiet.ok and "systemd-timesyncd is not running" in quiet.message
    assert not timesync.timesyncd_verdict(None, "gpu-01", True).ok
    assert timesync.timesyncd_verdict(None, "gpu-01", False).ok  # lab: reported only


def test_timesyncd_nodes_are_verified_like_chrony_nodes() -> None:
    spec = _spec(HOSTS / "example-baremetal.yaml", implementation="timesyncd", serve_from=[])
    plan = timesync.plan(spec, spec.node("gpu-01"))
    assert plan.summary[-1].startswith("verify: timedatectl must report NTP on")
