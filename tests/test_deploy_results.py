from __future__ import annotations

import io
import json

import pytest

from infra.deploy_results import changed_operations, main, parse_results

PAYLOAD = {
    "plan": [],
    "results": {
        "operations": [
            {"name": "[base] Write /etc/hosts", "success": [], "error": [], "no_change": ["a"]},
            {"name": "[timesync] Restart chrony", "success": ["b"], "error": [], "no_change": []},
        ]
    },
}


def test_changes_are_listed_with_hosts() -> None:
    text = "--> noise\n" + json.dumps(PAYLOAD)
    assert changed_operations(parse_results(text)) == ["[timesync] Restart chrony on b"]


def test_expect_no_change_fails_when_something_changed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(PAYLOAD)))
    assert main(["--expect-no-change"]) == 1
    assert "changed: [timesync] Restart chrony on b" in capsys.readouterr().out
