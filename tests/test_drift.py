"""Drift analysis of pyinfra's dry-run JSON: definite vs conditional changes, unreachable hosts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.drift import analyse, pulumi_drift, to_markdown, unified_diff
from infra.errors import UserError
from infra.spec import load_spec
from tests.conftest import HOSTS

LAB = load_spec(HOSTS / "lab.yaml")


def _op(name: str, change: list[str] = [], conditional: list[str] = []) -> dict[str, Any]:  # noqa: B006
    return {"name": name, "hosts_with_change": change, "hosts_with_conditional_change": conditional}


def test_conditional_follow_ups_alone_are_not_drift() -> None:
    payload = {"plan": [_op("[timesync] Restart chrony", conditional=["gpu-01", "gpu-02"])]}
    report = analyse(LAB, payload, "")
    assert not report.drifted
    assert "No drift" in to_markdown(report)


def test_definite_change_names_host_and_its_follow_ups() -> None:
    payload = {
        "plan": [
            _op("[timesync] Write /etc/chrony/chrony.conf", change=["gpu-01"]),
            _op("[timesync] Restart chrony", conditional=["gpu-01", "gpu-02", "lb-01"]),
            _op("[base] Apply sysctl settings", conditional=["gpu-01"]),
        ]
    }
    report = analyse(LAB, payload, "")
    assert report.drifted
    gpu01 = next(h for h in report.hosts if h.host == "gpu-01")
    assert gpu01.changes == ["[timesync] Write /etc/chrony/chrony.conf"]
    # Only the same role's follow-up is attributed to the change.
    assert gpu01.follow_ups == {
        "[timesync] Restart chrony": ["[timesync] Write /etc/chrony/chrony.conf"]
    }
    assert not next(h for h in report.hosts if h.host == "gpu-02").drifted
    markdown = to_markdown(report)
    assert "### gpu-01" in markdown and "### gpu-02" not in markdown
    assert "Restart chrony (after: [timesync] Write /etc/chrony/chrony.conf)" in markdown


def test_unreachable_hosts_are_named() -> None:
    log = "[gpu-02] Could not connect (Timeout connecting)\n"
    report = analyse(LAB, {"plan": []}, log)
    assert report.unreachable == ["gpu-02"]


def test_file_diff_shows_hand_edit() -> None:
    diff = unified_diff(
        "server a iburst\nmakestep 1 3\n",
        "server b iburst\nmakestep 1 3\n",
        "/etc/chrony/chrony.conf",
    )
    assert "-server a iburst" in diff and "+server b iburst" in diff
    assert "would be created" in unified_diff(None, "x\n", "/etc/x")


def _fake_pulumi(tmp_path: Path, exit_code: int, output: str) -> Path:
    tool = tmp_path / "pulumi"
    tool.write_text(
        f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\necho '{output}'\nexit {exit_code}\n"
    )
    tool.chmod(0o755)
    return tmp_path


def test_pulumi_stack_without_changes_is_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "PATH", f"{_fake_pulumi(tmp_path, 0, 'Resources: 50 unchanged')}:/usr/bin:/bin"
    )
    result = pulumi_drift("prod")
    assert not result.drifted
    assert "--expect-no-changes" in (tmp_path / "args").read_text()


def test_pulumi_stack_with_changes_is_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = "~ aws:ec2:Instance gpu-01 update; error: no changes were expected but changes were proposed"
    monkeypatch.setenv("PATH", f"{_fake_pulumi(tmp_path, 255, output)}:/usr/bin:/bin")
    result = pulumi_drift("prod")
    assert result.drifted and "gpu-01" in result.file_diffs["pulumi preview --diff"]


def test_pulumi_stack_without_the_cli_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="Pulumi CLI"):
        pulumi_drift("prod")
