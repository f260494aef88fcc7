"""`deepfleet diff`: a change to one deployment's TP size shows up on exactly its hosts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.commands.diff import compare
from tests.conftest import PROJECT


def test_compare_reports_added_removed_and_changed() -> None:
    before = {"gpu-01": {"file /a": "x\n", "file /b": "same\n"}, "old": {"file /c": "c\n"}}
    after = {"gpu-01": {"file /a": "y\n", "file /b": "same\n", "file /d": "new\n"}}
    changes = compare(before, after)
    assert set(changes) == {"gpu-01", "old"}
    assert set(changes["gpu-01"]) == {"file /a", "file /d"}
    assert "-x" in changes["gpu-01"]["file /a"] and "+y" in changes["gpu-01"]["file /a"]


@pytest.mark.slow
def test_tp_change_touches_exactly_the_affected_host(tmp_path: Path) -> None:
    clone = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(clone)], check=True)
    spec = clone / "hosts" / "example-baremetal.yaml"
    spec.write_text(spec.read_text().replace("parallelism: {tp: 4}", "parallelism: {tp: 2, dp: 2}"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "diff",
            "--base",
            "HEAD",
            "hosts/example-baremetal.yaml",
        ],
        cwd=clone,
        env={**os.environ, "PYTHONPATH": str(clone), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    hosts = [line[4:] for line in result.stdout.splitlines() if line.startswith("### ")]
    assert hosts == ["gpu-03"], result.stdout
    assert "sglang-qwen-32b-r1.service" in result.stdout
    assert "-    --tp-size 4" in result.stdout or "--tp-size 4" in result.stdout
    assert "--dp-size 2" in result.stdout


def test_no_change_exits_0(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "diff", "--base", "HEAD", "hosts/lab.yaml"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    # The working tree may differ from HEAD while developing; CI runs on a clean clone.
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=PROJECT).returncode:
        pytest.skip("working tree differs from HEAD")
    assert result.returncode == 0, result.stdout + result.stderr
