"""Running host commands, and the checks the lab needs before it touches the host."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infra.errors import Problem, UserError

# Programs the lab runs on the host and the Debian package that provides each one.
REQUIRED_TOOLS: Mapping[str, str] = {
    "ip": "iproute2",
    "nft": "nftables",
    "mount": "mount",
    "umount": "mount",
    "setsid": "util-linux",
    "systemd-nspawn": "systemd-container",
    "mmdebstrap": "mmdebstrap",
    "apt-cacher-ng": "apt-cacher-ng",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}
# Packages a fresh Debian 12 host needs for the lab (besides the Python environment).
HOST_PACKAGES = tuple(sorted(set(REQUIRED_TOOLS.values())))


class CommandFailed(UserError):
    """A host command the lab depends on failed; its stderr is the most useful message."""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 600,
    stdin_text: str | None = None,
) -> Result:
    completed = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        input=stdin_text,
        env=None if env is None else {**os.environ, **env},
    )
    result = Result(completed.returncode, completed.stdout, completed.stderr)
    if check and completed.returncode != 0:
        raise CommandFailed(
            f"`{' '.join(argv)}` failed (exit {completed.returncode})",
            [Problem((completed.stderr or completed.stdout).strip() or "no output")],
        )
    return result


def missing_tools(tools: Mapping[str, str] = REQUIRED_TOOLS) -> dict[str, str]:
    """Tool -> Debian package, for every required tool not found on PATH."""
    # sbin directories are not on a plain user's PATH on Debian, but the tools live there.
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return {tool: pkg for tool, pkg in tools.items() if shutil.which(tool, path=path) is None}


def preflight_problems() -> list[Problem]:
    """Why the lab cannot run here (empty when it can)."""
    problems: list[Problem] = []
    if os.geteuid() != 0:
        problems.append(
            Problem(
                "the lab needs root (network namespaces, bridges, mounts, systemd-nspawn)",
                hint="run it with sudo, or as root in CI",
            )
        )
    missing = missing_tools()
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        for tool, pkg in sorted(missing.items()):
            problems.append(Problem(f"`{tool}` is not installed (Debian package {pkg})"))
        problems.append(
            Problem(
                "install the missing tools",
                hint=f"apt-get install --no-install-recommends {packages}",
            )
        )
    return problems


def preflight() -> None:
    problems = preflight_problems()
    if problems:
        raise UserError("the lab cannot run on this machine", problems)
