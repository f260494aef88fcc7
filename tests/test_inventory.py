"""Where the inventory gets cloud nodes' addresses: a saved outputs file, else the stack's
`pulumi stack output --json` (a fake `pulumi` on PATH here, as in tests/test_drift.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra import inventory
from infra.inventory import OUTPUTS_VARIABLE, STACK_VARIABLE, inventory_groups, node_addresses
from infra.spec import load_spec
from tests.conftest import HOSTS

AWS = load_spec(HOSTS / "example-aws.yaml")
BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
OUTPUTS = {
    "node_addresses": {"gpu-01": "10.42.16.37", "lb-01": "10.42.16.12"},
    "node_groups": {"gpu": ["gpu-01"], "lb": ["lb-01"]},
    "storage_mount_targets": {"models": "fs-0abc.fsx.us-east-2.amazonaws.com@tcp:/mnt1"},
}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(OUTPUTS_VARIABLE, raising=False)
    monkeypatch.delenv(STACK_VARIABLE, raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    inventory._stack_output_text.cache_clear()
    yield
    inventory._stack_output_text.cache_clear()


def fake_pulumi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str, exit_code: int = 0
) -> Path:
    """A `pulumi` that records its arguments in `args` and prints `stdout`; returns args."""
    (tmp_path / "stdout").write_text(stdout)
    tool = tmp_path / "pulumi"
    tool.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/args\ncat {tmp_path}/stdout\n'
        f"[ {exit_code} -eq 0 ] || echo 'error: no stack named example-aws found' >&2\n"
        f"exit {exit_code}\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    return tmp_path / "args"


def addresses(groups: dict[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, str]:
    return {name: data["ssh_hostname"] for entries in groups.values() for name, data in entries}


def test_the_stack_named_after_the_spec_gives_the_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = fake_pulumi(tmp_path, monkeypatch, json.dumps(OUTPUTS))
    groups = inventory_groups(AWS)
    assert addresses(groups) == OUTPUTS["node_addresses"]
    assert groups["gpu"][0][1]["storage_mount_targets"] == OUTPUTS["storage_mount_targets"]
    # One call per process, whatever asks; never with --show-secrets.
    node_addresses(AWS)
    assert args.read_text().splitlines() == [
        "stack output --json --stack example-aws --non-interactive"
    ]


def test_deepfleet_stack_names_another_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = fake_pulumi(tmp_path, monkeypatch, json.dumps(OUTPUTS))
    monkeypatch.setenv(STACK_VARIABLE, "prod-use2")
    assert node_addresses(AWS)["gpu-01"] == "10.42.16.37"
    assert "--stack prod-use2" in args.read_text()


def test_a_failing_stack_is_an_error_naming_it_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_pulumi(tmp_path, monkeypatch, "", exit_code=255)
    with pytest.raises(SystemExit) as stop:
        inventory_groups(AWS)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "--stack example-aws" in error and "failed (exit 255" in error
    assert "no stack named example-aws found" in error  # pulumi's own words
    assert "pulumi stack ls" in error and f"{OUTPUTS_VARIABLE}=outputs.json" in error


def test_output_that_is_not_json_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_pulumi(tmp_path, monkeypatch, "Current stack outputs (3):")
    with pytest.raises(SystemExit):
        node_addresses(AWS)
    assert "pulumi stack example-aws: not JSON" in capsys.readouterr().err


def test_outputs_of_another_spec_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = {"node_addresses": {"gpu-01": "10.0.0.5", "gpu-07": "10.0.0.6"}}
    fake_pulumi(tmp_path, monkeypatch, json.dumps(other))
    with pytest.raises(SystemExit):
        node_addresses(AWS)
    error = capsys.readouterr().err
    assert "spec example-aws lacks (gpu-07)" in error and STACK_VARIABLE in error


def test_the_saved_file_wins_and_pulumi_is_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = fake_pulumi(tmp_path, monkeypatch, "", exit_code=255)
    saved = tmp_path / "outputs.json"
    saved.write_text(json.dumps(OUTPUTS))
    monkeypatch.setenv(OUTPUTS_VARIABLE, str(saved))
    assert addresses(inventory_groups(AWS)) == OUTPUTS["node_addresses"]
    assert not args.exists()


def test_pulumi_is_not_asked_when_the_spec_has_every_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = fake_pulumi(tmp_path, monkeypatch, "", exit_code=255)
    groups = inventory_groups(BAREMETAL)
    assert addresses(groups)["gpu-01"] == str(BAREMETAL.node("gpu-01").address)
    assert not args.exists()


def test_an_empty_deepfleet_stack_turns_pulumi_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = fake_pulumi(tmp_path, monkeypatch, "", exit_code=255)
    monkeypatch.setenv(STACK_VARIABLE, "")
    assert node_addresses(AWS) == {}
    assert not args.exists()


def test_without_the_cli_or_a_file_the_error_names_both_ways(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        inventory_groups(AWS)
    error = capsys.readouterr().err
    assert "no address for gpu-01, lb-01" in error
    assert "stack example-aws" in error and f"{OUTPUTS_VARIABLE}=outputs.json" in error


def test_a_named_stack_without_the_cli_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(STACK_VARIABLE, "prod-use2")
    with pytest.raises(SystemExit):
        node_addresses(AWS)
    assert "DEEPFLEET_STACK=prod-use2 but the pulumi CLI is not on PATH" in capsys.readouterr().err
