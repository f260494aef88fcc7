"""apt-cacher-ng on the bridge address: the only way lab nodes reach a Debian mirror.

It runs as a plain background process (the host has no systemd) with a config of our own:
the stock config's Remap rules made it answer 503 for the host's mirror, while without them it
acts as a caching HTTP proxy for whatever `sources` the nodes use.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from infra.errors import Problem
from infra.lab.paths import LabPaths
from infra.lab.plan import LabPlan
from infra.lab.system import CommandFailed

PORT = 3142
PROGRAM = "apt-cacher-ng"


def acng_conf(plan: LabPlan, paths: LabPaths) -> str:
    return "\n".join(
        [
            "# Written by `deepfleet lab up`; no Remap lines on purpose (see infra/lab/aptcache.py).",
            f"CacheDir: {paths.acng_cache.resolve()}",
            f"LogDir: {paths.acng_dir.resolve() / 'log'}",
            "SupportDir: /usr/lib/apt-cacher-ng",
            f"BindAddress: {plan.host_address}",
            f"Port: {PORT}",
            f"PidFile: {paths.acng_dir.resolve() / 'pid'}",
            f"SocketPath: {paths.acng_dir.resolve() / 'socket'}",
            "ForeGround: 1",
            "ReportPage: acng-report.html",
            "ExThreshold: 4",
            "",
        ]
    )


def acng_argv(paths: LabPaths) -> list[str]:
    # The config dir is on the command line, which is also how `lab down` recognises our
    # process among the host's (see leftovers.py).
    return [PROGRAM, "-c", str((paths.acng_dir / "conf").resolve())]


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start(plan: LabPlan, paths: LabPaths, timeout: float = 10.0) -> int | None:
    """Start the cache unless something already answers on BRIDGE:3142; returns the new PID.

    What already answers is normally our own cache from an earlier `up`. A host-wide
    apt-cacher-ng (the Debian service on a systemd host) is reused too: ours could not bind the
    port anyway, and `lab down` leaves such a foreign process alone.
    """
    host = str(plan.host_address)
    if answers(host, PORT):
        return None
    conf = paths.acng_dir / "conf"
    for directory in (conf, paths.acng_dir / "log", paths.acng_cache):
        directory.mkdir(parents=True, exist_ok=True)
    (conf / "acng.conf").write_text(acng_conf(plan, paths))
    paths.logs.mkdir(parents=True, exist_ok=True)
    with open(paths.logs / "apt-cacher-ng.log", "ab") as log:
        process = subprocess.Popen(
            acng_argv(paths),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(host, PORT):
            return process.pid
        if process.poll() is not None:
            break
        time.sleep(0.1)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
    tail = (paths.logs / "apt-cacher-ng.log").read_text(errors="replace")[-2000:].strip()
    raise CommandFailed(
        f"apt-cacher-ng did not start on {host}:{PORT}",
        [Problem(tail or "no output", hint="see .lab/logs/apt-cacher-ng.log")],
    )
