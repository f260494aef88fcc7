"""The cached Debian rootfs that every lab node boots from, as the lower layer of an overlay."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from infra.lab.system import run

SUITE = "bookworm"
VARIANT = "apt"
# What a node needs to boot and be managed (systemd, sshd, python3 for pyinfra facts), plus what
# the roles install often enough that fetching it on every fresh node would waste time.
PACKAGES = (
    "ca-certificates",
    "curl",
    "dbus",
    "gnupg",
    "iproute2",
    "iputils-ping",
    "less",
    "nftables",
    "openssh-server",
    "procps",
    "python3",
    "sudo",
    "systemd",
    "systemd-sysv",
    "tzdata",
)
# Bump when `customize` changes, so that cached trees made by older code are not reused.
CUSTOMIZE_VERSION = 1
# Timers that would grab the apt lock behind a deploy's back, or make no sense in a container.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "fstrim.timer")
SSHD_DROPIN = """\
# deepfleet lab: key-only root login (the lab key is in .lab/ssh of the checkout).
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
"""


@dataclass(frozen=True)
class RootfsRecipe:
    suite: str = SUITE
    variant: str = VARIANT
    packages: tuple[str, ...] = PACKAGES

    @property
    def key(self) -> str:
        text = json.dumps(
            {
                "suite": self.suite,
                "variant": self.variant,
                "packages": sorted(self.packages),
                "customize": CUSTOMIZE_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def directory(self, cache_root: Path) -> Path:
        return cache_root / f"rootfs-{self.key}"

    def mmdebstrap_argv(self, target: Path) -> list[str]:
        return [
            "mmdebstrap",
            f"--variant={self.variant}",
            f"--include={','.join(self.packages)}",
            self.suite,
            str(target),
        ]


@dataclass(frozen=True)
class RootfsResult:
    path: Path
    built: bool
    seconds: float


def customize(root: Path) -> None:
    """Make a fresh mmdebstrap tree bootable as many distinct lab nodes."""
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
        (root / "etc/systemd/system/timers.target.wants" / unit).unlink(missing_ok=True)
    # mmdebstrap copies the build host's name and resolver; nodes get their own name from
    # systemd-nspawn's --machine, and have no DNS server to reach.
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/deepfleet-lab.conf").write_text(SSHD_DROPIN)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def ensure_rootfs(cache_root: Path, recipe: RootfsRecipe | None = None) -> RootfsResult:
    """Return the cached rootfs, building it first (about a minute) if it is absent."""
    recipe = recipe or RootfsRecipe()
    target = recipe.directory(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Two `lab up` at once (a developer and a test run) must not build the same tree twice.
    with open(cache_root / f".rootfs-{recipe.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return RootfsResult(target, built=False, seconds=time.monotonic() - started)
        scratch = cache_root / f".rootfs-{recipe.key}.{os.getpid()}.tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            run(recipe.mmdebstrap_argv(scratch), timeout=1800)
            customize(scratch)
            (scratch / "etc/deepfleet-lab-rootfs").write_text(
                json.dumps(
                    {"key": recipe.key, "suite": recipe.suite, "packages": list(recipe.packages)}
                )
                + "\n"
            )
            # The rename publishes the tree only once it is complete.
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return RootfsResult(target, built=True, seconds=time.monotonic() - started)
