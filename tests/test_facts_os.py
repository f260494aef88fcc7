"""Facts for the OS roles: pure `process()` on outputs captured from the real commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyinfra.api.exceptions import FactProcessError

from facts.chrony import ChronyTracking, TimesyncdStatus, parse_tracking
from facts.storage import ModelCache, MountPoint, parse_cache_line

FIXTURES = Path(__file__).parent / "fixtures" / "facts"


def _lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def test_tracking_synchronised_to_a_server() -> None:
    tracking = ChronyTracking().process(_lines("chronyc-tracking-synchronised.csv"))
    assert tracking is not None
    assert tracking.synchronised and not tracking.local_clock
    assert tracking.reference == "127.0.0.1"
    assert tracking.stratum == 11
    assert tracking.leap_status == "Normal"
    # chronyc's CSV says -0.000002121 ("fast of NTP time"): the clock is 2.121 us ahead.
    assert tracking.offset_seconds == pytest.approx(2.121e-6)
    assert "stratum 11" in tracking.describe() and "+0.002 ms" in tracking.describe()


def test_tracking_before_the_first_sample_is_not_synchronised() -> None:
    tracking = ChronyTracking().process(_lines("chronyc-tracking-unsynchronised.csv"))
    assert tracking is not None
    assert not tracking.synchronised
    assert tracking.stratum == 0 and tracking.leap_status == "Not synchronised"
    assert tracking.describe().startswith("not synchronised (stratum 0")


def test_tracking_of_a_local_stratum_server() -> None:
    tracking = ChronyTracking().process(_lines("chronyc-tracking-local-stratum.csv"))
    assert tracking is not None
    assert tracking.synchronised and tracking.local_clock
    assert tracking.stratum == 10
    assert "its own clock" in tracking.describe()


def test_tracking_when_chronyd_does_not_answer() -> None:
    # chronyc says so on stdout with a numbered status, and exits 1 (the command's `|| true`).
    assert ChronyTracking().process(_lines("chronyc-tracking-no-daemon.txt")) is None
    assert ChronyTracking().process([]) is None
    assert ChronyTracking().process(["", "  "]) is None


@pytest.mark.parametrize(
    ("fixture", "ntp", "synchronised", "server", "described"),
    [
        ("timedatectl-ntp-off.txt", False, False, "", "NTP is off (timedatectl set-ntp false)"),
        (
            "timedatectl-unsynchronised.txt",
            True,
            False,
            "",
            "not synchronised, no NTP reply since timesyncd started, no server yet",
        ),
        (
            "timedatectl-synchronised.txt",
            True,
            True,
            "ntp.example.internal (192.0.2.5)",
            "synchronised, server ntp.example.internal (192.0.2.5)",
        ),
        (
            # The kernel still says synchronised (an earlier sync), but no reply came since
            # timesyncd restarted with its new servers.
            "timedatectl-stale.txt",
            True,
            True,
            "ntp.example.internal",
            "synchronised, no NTP reply since timesyncd started, server ntp.example.internal",
        ),
    ],
)
def test_timesyncd_status(
    fixture: str, ntp: bool, synchronised: bool, server: str, described: str
) -> None:
    status = TimesyncdStatus().process(_lines(fixture))
    assert status is not None
    assert (status.ntp_enabled, status.synchronised, status.server) == (ntp, synchronised, server)
    assert status.describe() == described
    assert (
        status.answered
        == {
            "timedatectl-ntp-off.txt": None,  # show-timesync said nothing
            "timedatectl-unsynchronised.txt": False,
            "timedatectl-synchronised.txt": True,
            "timedatectl-stale.txt": False,
        }[fixture]
    )


def test_timesyncd_status_when_timedated_does_not_answer() -> None:
    assert TimesyncdStatus().process([]) is None
    assert TimesyncdStatus().process(["Failed to connect to bus: Host is down"]) is None


@pytest.mark.parametrize(
    "line",
    [
        "chronyc: command not understood",
        "7F000001,127.0.0.1,eleven,0,0,0,0,0,0,0,0,0,0,Normal",
    ],
)
def test_tracking_rejects_what_it_cannot_read(line: str) -> None:
    with pytest.raises(FactProcessError):
        parse_tracking(line)


def test_tracking_command_is_machine_readable_and_tolerates_a_stopped_daemon() -> None:
    fact = ChronyTracking()
    assert fact.command() == "chronyc -c -n tracking 2>&1 || true"
    assert fact.requires_command() == "chronyc"


def test_mount_point_read_only_bind() -> None:
    state = MountPoint().process(_lines("findmnt-bind-ro.txt"))
    assert state is not None
    assert state.target == "/data/models"
    assert state.source == "/dev/vda[/var/lib/deepfleet-lab/models]"
    assert state.fstype == "ext4"
    assert state.read_only


def test_mount_point_read_write_bind() -> None:
    state = MountPoint().process(_lines("findmnt-bind-rw.txt"))
    assert state is not None and not state.read_only


def test_mount_point_nothing_mounted() -> None:
    assert MountPoint().process([]) is None


def test_mount_point_command_quotes_the_path() -> None:
    command = MountPoint().command(path="/data/my models").get_raw_value()
    assert command == (
        "findmnt -P -o TARGET,SOURCE,FSTYPE,OPTIONS --mountpoint '/data/my models' || true"
    )


def test_mount_point_rejects_garbage() -> None:
    with pytest.raises(FactProcessError):
        MountPoint().process(["findmnt: unknown column"])


DIGEST = "a" * 64
OTHER = "b" * 64


@pytest.mark.parametrize(
    ("line", "state"),
    [
        (f"m\tverified {DIGEST} 2026-11-23T18:00:00Z\t{DIGEST}  -", "verified"),
        (f"m\tverified {OTHER} 2026-11-23T18:00:00Z\t{DIGEST}  -", "stale"),
        (f"m\tfailed {DIGEST} 2026-11-23T18:00:00Z\t{DIGEST}  -", "failed"),
        (f"m\t-\t{DIGEST}  -", "missing"),
        ("m\t-\t-", "no-manifest"),
    ],
)
def test_model_cache_states(line: str, state: str) -> None:
    status = parse_cache_line(line)
    assert status.state == state
    assert status.model_path == "m"
    assert status.describe().startswith("m: ")


def test_model_cache_rejects_an_unknown_status() -> None:
    with pytest.raises(FactProcessError):
        parse_cache_line(f"m\tmaybe {DIGEST}\t{DIGEST}  -")


def test_model_cache_command_covers_every_model() -> None:
    command = ModelCache().command("/data/models", "/nvme/cache", ["r1", "qwen 32b"])
    assert command.count("printf") == 2
    assert "'/nvme/cache/qwen 32b'/.deepfleet-cache-status" in command
    assert "'/data/models/qwen 32b/SHA256SUMS'" in command
    assert ModelCache().command("/data/models", "/nvme/cache", []) == "true"
