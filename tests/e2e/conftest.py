"""The `lab` fixture: real lab nodes, brought up once per test session and removed after.

Needs root and the lab's tools (CI has both); elsewhere the tests are skipped with the reason.
Set DEEPFLEET_LAB_KEEP=1 to leave the lab running after the session (for poking at it).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.lab import LabPaths, LabPlan, UpReport, down, plan_from_spec, preflight_problems, up
from infra.lab.lifecycle import ssh_argv

PROJECT = Path(__file__).resolve().parents[2]
LAB_SPEC = PROJECT / "hosts" / "lab.yaml"


@dataclass
class Lab:
    plan: LabPlan
    paths: LabPaths
    report: UpReport

    def ssh(
        self, node: str, command: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ssh_argv(self.plan, self.paths, node, [command]),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def lab_paths() -> LabPaths:
    return LabPaths(state=PROJECT / ".lab")


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    problems = preflight_problems()
    if problems:
        pytest.skip("lab unavailable: " + "; ".join(p.message for p in problems))
    from infra.spec import load_spec

    plan = plan_from_spec(load_spec(LAB_SPEC))
    paths = lab_paths()
    # Start from a clean host: leftovers of an earlier run would hide bugs in `up`.
    down(paths, [plan.bridge])
    try:
        report = up(plan, paths, spec_path=str(LAB_SPEC))
        yield Lab(plan, paths, report)
    finally:
        if os.environ.get("DEEPFLEET_LAB_KEEP") != "1":
            down(paths, [plan.bridge])
