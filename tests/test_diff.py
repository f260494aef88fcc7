"""`deepfleet diff`: a change to one deployment's TP size shows up on exactly its hosts; a change
to a cloud setting shows up as exactly one property of one Pulumi resource; secrets stay masked."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.commands import diff as diff_command
from infra.commands.diff import compare
from infra.pulumi_graph import PLACEHOLDER_KEY
from infra.snapshot import SECRET, property_lines, take_snapshot
from infra.spec import load_spec
from tests.conftest import HOSTS, PROJECT


def test_compare_reports_added_removed_and_changed() -> None:
    before = {"gpu-01": {"file /a": "x\n", "file /b": "same\n"}, "old": {"file /c": "c\n"}}
    after = {"gpu-01": {"file /a": "y\n", "file /b": "same\n", "file /d": "new\n"}}
    changes = compare(before, after)
    assert set(changes) == {"gpu-01", "old"}
    assert set(changes["gpu-01"]) == {"file /a", "file /d"}
    assert "-x" in changes["gpu-01"]["file /a"] and "+y" in changes["gpu-01"]["file /a"]


def _changed_lines(diff: str) -> list[str]:
    return [
        line
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def _aws_with(tmp_path: Path, old: str, new: str) -> Path:
    text = (HOSTS / "example-aws.yaml").read_text()
    assert old in text
    spec = tmp_path / "example-aws.yaml"
    spec.write_text(text.replace(old, new))
    return spec


def test_instance_type_change_is_that_property_of_the_gpu_instance(tmp_path: Path) -> None:
    before = take_snapshot(load_spec(HOSTS / "example-aws.yaml"))
    spec = _aws_with(tmp_path, "gpu_instance_type: p5e.48xlarge", "gpu_instance_type: p5.48xlarge")
    changes = compare(before, take_snapshot(load_spec(spec)))
    assert list(changes) == ["pulumi"], changes
    instance = "aws:ec2/instance:Instance example-aws-gpu-gpu-01-instance"
    template = "aws:ec2/launchTemplate:LaunchTemplate example-aws-gpu-efa-lt"
    assert set(changes["pulumi"]) == {instance, template}
    assert _changed_lines(changes["pulumi"][instance]) == [
        '-instanceType: "p5e.48xlarge"',
        '+instanceType: "p5.48xlarge"',
    ]
    # The EFA launch template's description names the instance type: a real input change.
    assert _changed_lines(changes["pulumi"][template]) == [
        '-description: "32 EFA interface(s) for p5e.48xlarge"',
        '+description: "32 EFA interface(s) for p5.48xlarge"',
    ]


def test_admin_cidr_and_root_volume_changes_show_as_properties(tmp_path: Path) -> None:
    before = take_snapshot(load_spec(HOSTS / "example-aws.yaml"))
    spec = _aws_with(tmp_path, "root_volume_gb: 500", "root_volume_gb: 800")
    spec.write_text(spec.read_text().replace("198.51.100.0/28", "198.51.100.16/28"))
    changes = compare(before, take_snapshot(load_spec(spec)))["pulumi"]
    lines = [line for diff in changes.values() for line in _changed_lines(diff)]
    assert any(line.endswith("volumeSize: 800") and line[0] == "+" for line in lines), lines
    assert any('"198.51.100.16/28"' in line and line[0] == "+" for line in lines), lines
    assert all("198.51.100" in line or "volumeSize" in line for line in lines), lines


def test_pulumi_secrets_stay_masked() -> None:
    # The baremetal bootstrap commands log in with a secret key: its value never shows.
    snapshot = take_snapshot(load_spec(HOSTS / "example-baremetal.yaml"))
    text = "".join(snapshot["pulumi"].values())
    assert PLACEHOLDER_KEY not in text
    assert f": {SECRET}" in text


def test_property_lines_flatten_nested_inputs() -> None:
    from pulumi.runtime import rpc

    inputs = {
        "tags": {"Name": "gpu-01"},
        "rootBlockDevice": {"volumeSize": 500.0, "encrypted": True},
        "securityGroupIds": ["sg-1", "sg-2"],
        "userData": "#!/bin/sh\necho hi\n",
        "connection": {"privateKey": rpc.wrap_rpc_secret("KEY"), "user": "root"},
        "empty": [],
    }
    assert list(property_lines(inputs)) == [
        "connection.privateKey: [secret]",
        'connection.user: "root"',
        "empty: []",
        "rootBlockDevice.encrypted: true",
        "rootBlockDevice.volumeSize: 500",
        'securityGroupIds[0]: "sg-1"',
        'securityGroupIds[1]: "sg-2"',
        'tags.Name: "gpu-01"',
        "userData: |",
        "  #!/bin/sh",
        "  echo hi",
    ]


def test_diff_prints_long_lines_unwrapped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Piped output (CI logs): rich would wrap at 80 columns and split the +/- lines.
    long_line = "    --context-length 65536" + " --flag value" * 12
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(diff_command, "_git", lambda *args, **kwargs: "0" * 40)
    monkeypatch.setattr(diff_command, "load_spec", lambda spec: spec)
    monkeypatch.setattr(
        diff_command, "base_snapshot", lambda tree, spec: {"gpu-01": {"engine x": "old\n"}}
    )
    monkeypatch.setattr(
        diff_command, "take_snapshot", lambda spec: {"gpu-01": {"engine x": long_line + "\n"}}
    )
    args = argparse.Namespace(base="HEAD", specs=["hosts/lab.yaml"], markdown=None)
    assert diff_command.run(args) == 3
    assert f"+{long_line}\n" in capsys.readouterr().out


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
