"""Drift analysis of pyinfra's dry-run JSON: definite vs conditional changes, unreachable hosts."""

from __future__ import annotations

from typing import Any

from infra.drift import analyse, to_markdown, unified_diff
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
