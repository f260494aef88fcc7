"""Run the real `pyinfra` CLI over its `@fake` connector: an inventory and a deploy written to a
temporary directory, against `hosts/example-baremetal.yaml`. Nothing reaches a machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import HOSTS

ANSI = re.compile(r"\x1b\[[0-9;]*m")
COMMAND = re.compile(r"^\[@fake/([\w-]+)\]\s+>>> (.*)$", re.M)


@dataclass(frozen=True)
class FakeRun:
    text: str
    """stdout and stderr, without colours."""
    returncode: int
    stderr: str

    @property
    def commands(self) -> list[tuple[str, str]]:
        """(host, command) in the order pyinfra ran them (-vv prints each)."""
        return COMMAND.findall(self.text)


def run_fake_deploy(
    tmp_path: Path, inventory: str, deploy: str, env: Mapping[str, str | None]
) -> FakeRun:
    """ENV adds to (or, with None, removes from) the environment the CLI runs in."""
    (tmp_path / "inv.py").write_text(inventory)
    (tmp_path / "deploy.py").write_text(deploy)
    project = HOSTS.parent
    full = {
        **os.environ,
        "SPEC": str(HOSTS / "example-baremetal.yaml"),
        "PYTHONPATH": str(project),
        "PYINFRA_FAKE_DELAY": "0",
        "PYINFRA_PROGRESS": "off",
    }
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    pyinfra = Path(sys.executable).parent / "pyinfra"
    result = subprocess.run(
        [str(pyinfra), "-y", "-vv", str(tmp_path / "inv.py"), str(tmp_path / "deploy.py")],
        cwd=project,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return FakeRun(ANSI.sub("", result.stdout + result.stderr), result.returncode, result.stderr)
