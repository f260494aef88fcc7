"""Facts about the clock: `chronyc -c tracking` under chrony, `timedatectl` under timesyncd."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase

# Fields of `chronyc -c tracking` (chronyc(1), "tracking"), in order.
TRACKING_FIELDS = (
    "reference_id",
    "reference_name",
    "stratum",
    "ref_time",
    "system_time",
    "last_offset",
    "rms_offset",
    "frequency_ppm",
    "residual_frequency_ppm",
    "skew_ppm",
    "root_delay",
    "root_dispersion",
    "update_interval",
    "leap_status",
)
# chronyd's reference ID when it serves its own clock (`local stratum N`): 127.127.1.1.
LOCAL_REFERENCE_ID = "7F7F0101"
UNSYNCHRONISED = "Not synchronised"
# chronyc reports its own failures on stdout as a numbered status ("506 Cannot talk to
# daemon" when chronyd is not running, "501 Not authorised"), and exits 1.
CHRONYC_STATUS = re.compile(r"^\d{3} ")


@dataclass(frozen=True)
class Tracking:
    """chronyd's view of the clock.

    `offset_seconds` is the local clock minus NTP time: positive means the clock is fast. (The
    CSV's "system time" field has the opposite sign: it is the correction chronyd still has to
    apply, positive when the clock is slow.)
    """

    reference_id: str
    reference: str  # the source's name or address; empty for the local clock or none
    stratum: int
    offset_seconds: float
    root_delay_seconds: float
    root_dispersion_seconds: float
    leap_status: str

    @property
    def synchronised(self) -> bool:
        return self.leap_status != UNSYNCHRONISED and self.stratum > 0

    @property
    def local_clock(self) -> bool:
        """Synchronised to nothing but its own clock (`local stratum`): no upstream reachable."""
        return self.reference_id.upper() == LOCAL_REFERENCE_ID

    def describe(self) -> str:
        if not self.synchronised:
            return f"not synchronised (stratum {self.stratum}, leap status {self.leap_status!r})"
        source = "its own clock (local stratum)" if self.local_clock else self.reference
        return (
            f"synchronised to {source or self.reference_id}, stratum {self.stratum}, "
            f"offset {self.offset_seconds * 1000:+.3f} ms, leap status {self.leap_status}"
        )


def parse_tracking(line: str) -> Tracking:
    fields = line.strip().split(",")
    if len(fields) != len(TRACKING_FIELDS):
        raise FactProcessError(
            f"chronyc -c tracking: expected {len(TRACKING_FIELDS)} fields, got {len(fields)}: "
            f"{line!r}"
        )
    values = dict(zip(TRACKING_FIELDS, fields, strict=True))
    try:
        return Tracking(
            reference_id=values["reference_id"],
            reference=values["reference_name"],
            stratum=int(values["stratum"]),
            offset_seconds=-float(values["system_time"]),
            root_delay_seconds=float(values["root_delay"]),
            root_dispersion_seconds=float(values["root_dispersion"]),
            leap_status=values["leap_status"],
        )
    except ValueError as error:
        raise FactProcessError(f"chronyc -c tracking: {error}: {line!r}") from error


class ChronyTracking(FactBase[Tracking | None]):
    """chronyd's tracking report; None when chronyd does not answer (stopped, or chronyc
    refused: its numbered status line). chronyc missing altogether gives the default, None."""

    def requires_command(self) -> str:
        return "chronyc"

    def command(self) -> str:
        # -c: one machine-readable CSV line; -n: no DNS lookups of the source's address.
        # A stopped chronyd is a state to report, not a failure to read the fact.
        return "chronyc -c -n tracking 2>&1 || true"

    def process(self, output: list[str]) -> Tracking | None:
        lines = [line for line in output if line.strip()]
        if not lines or CHRONYC_STATUS.match(lines[0]):
            return None
        return parse_tracking(lines[0])


# --- systemd-timesyncd (site.ntp.implementation: timesyncd) ------------------------------------


@dataclass(frozen=True)
class TimesyncStatus:
    """What `timedatectl show` and `show-timesync` say: whether NTP is on and the kernel clock
    is synchronised (timesyncd sets that after its first good answer), and from which server."""

    ntp_enabled: bool
    synchronised: bool
    server: str  # "name (address)", or "" when timesyncd has not picked one
    answered: bool | None = None
    """Whether timesyncd got a reply since it started (its NTPMessage); None when
    `show-timesync` said nothing (timesyncd not running, or a systemd without it)."""

    def describe(self) -> str:
        if not self.ntp_enabled:
            return "NTP is off (timedatectl set-ntp false)"
        state = "synchronised" if self.synchronised else "not synchronised"
        if self.answered is False:
            state += ", no NTP reply since timesyncd started"
        elif self.answered is None:
            state += ", timesyncd not answering (show-timesync printed nothing)"
        return f"{state}" + (f", server {self.server}" if self.server else ", no server yet")


def parse_timesync(lines: list[str]) -> TimesyncStatus | None:
    values = dict(
        line.strip().split("=", 1) for line in lines if "=" in line and not line.startswith(" ")
    )
    if "NTPSynchronized" not in values:
        return None
    name, address = values.get("ServerName", ""), values.get("ServerAddress", "")
    # show-timesync prints NTPMessage only once a reply came (its packet count is not 0).
    timesync_said = "ServerName" in values or "ServerAddress" in values
    return TimesyncStatus(
        ntp_enabled=values.get("NTP") == "yes",
        synchronised=values["NTPSynchronized"] == "yes",
        server=f"{name} ({address})" if name and address else name or address,
        answered=bool(values.get("NTPMessage")) if timesync_said else None,
    )


class TimesyncdStatus(FactBase[TimesyncStatus | None]):
    """timedatectl's view of the clock under systemd-timesyncd; None when timedated does not
    answer (no D-Bus, timedatectl missing).

    NTPSynchronized alone is not proof: the kernel keeps it for hours after the last sync (by
    whichever daemon), so a restarted timesyncd with unreachable servers still says yes.
    The reply since the start (NTPMessage) is."""

    def requires_command(self) -> str:
        return "timedatectl"

    def command(self) -> str:
        # show-timesync (systemd 239+) names the server; its failure leaves the rest usable.
        return (
            "timedatectl show -p NTP -p NTPSynchronized 2>/dev/null; "
            "timedatectl show-timesync -p ServerName -p ServerAddress -p NTPMessage "
            "2>/dev/null; true"
        )

    def process(self, output: list[str]) -> TimesyncStatus | None:
        return parse_timesync(output)
