"""Drift analysis of pyinfra's dry run: definite vs conditional changes, hosts whose drift is
unknown (unreachable, failed), honest follow-ups, file diffs for cloud nodes, Pulumi.

The pyinfra logs below are captured from pyinfra 3.10.0 (`--dry --json`, stderr), with the
host names changed to the lab's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import infra.drift as drift_module
from infra.commands import drift as drift_command
from infra.drift import (
    DriftReport,
    HostDrift,
    add_file_diffs,
    analyse,
    pulumi_drift,
    run_dry,
    scope_of,
    to_markdown,
    unified_diff,
)
from infra.errors import UserError
from infra.plan import plan_cluster
from infra.spec import load_spec
from tests.conftest import HOSTS

LAB = load_spec(HOSTS / "lab.yaml")
LAB_HOSTS = ["lb-01", "gpu-01", "gpu-02", "infra-01"]


def _op(name: str, change: list[str] = [], conditional: list[str] = []) -> dict[str, Any]:  # noqa: B006
    return {"name": name, "hosts_with_change": change, "hosts_with_conditional_change": conditional}


def _log(connected: list[str], *lines: str) -> str:
    """pyinfra's stderr: a `Connected` line per host that connected, then `lines`."""
    head = ["--> Loading config...", "--> Loading inventory...", "--> Connecting to hosts..."]
    return "\n".join(
        [*head, *(f"    [{h}]  Connected" for h in connected), *lines, "--> Disconnecting..."]
    )


CONNECTED = _log(LAB_HOSTS)


def test_conditional_follow_ups_alone_are_not_drift() -> None:
    payload = {"plan": [_op("[timesync] Restart chrony", conditional=["gpu-01", "gpu-02"])]}
    report = analyse(LAB, payload, CONNECTED)
    assert not report.drifted and report.complete
    assert "No drift: every host matches" in to_markdown(report)


def test_chrony_edit_claims_no_trigger_its_follow_ups_do_not_name() -> None:
    # An edited chrony.conf: pyinfra lists both timesync follow-ups as conditional; neither name
    # says it follows from chrony.conf, so neither is claimed as triggered by it.
    restart = "[timesync] Restart chrony after its configuration changed"
    reload_ = "[timesync] Reload systemd after the chrony drop-in changed"
    payload = {
        "plan": [
            _op("[timesync] Write /etc/chrony/chrony.conf", change=["gpu-01"]),
            _op(reload_, conditional=LAB_HOSTS),
            _op(restart, conditional=LAB_HOSTS),
            _op("[base] Apply sysctl settings", conditional=["gpu-01"]),
        ]
    }
    report = analyse(LAB, payload, CONNECTED)
    assert report.drifted
    gpu01 = next(h for h in report.hosts if h.host == "gpu-01")
    assert gpu01.changes == ["[timesync] Write /etc/chrony/chrony.conf"]
    assert gpu01.follow_ups == {}
    # Only the changed role's conditional operations may run; base has no change.
    assert gpu01.may_follow == [reload_, restart]
    assert not next(h for h in report.hosts if h.host == "gpu-02").drifted
    markdown = to_markdown(report)
    assert "### gpu-01" in markdown and "### gpu-02" not in markdown
    assert "(after:" not in markdown
    assert "May also run (gated on a change in their role" in markdown
    assert f"- {restart}" in markdown and "Apply sysctl" not in markdown


def test_follow_up_named_after_the_changed_file_is_tied_to_it() -> None:
    write = "[model_storage] Write /etc/systemd/system/mnt-models.mount"
    reload_ = "[model_storage] Reload systemd after mnt-models.mount changed"
    other = "[model_storage] Reload systemd after deepfleet-cache.service changed"
    # Names the unit, but not as what it runs after: no claim.
    mount = "[model_storage] Mount mnt-models.mount again"
    payload = {
        "plan": [
            _op(write, change=["infra-01"]),
            _op(reload_, conditional=["infra-01"]),
            _op(other, conditional=["infra-01"]),
            _op(mount, conditional=["infra-01"]),
        ]
    }
    infra01 = next(h for h in analyse(LAB, payload, CONNECTED).hosts if h.host == "infra-01")
    assert infra01.follow_ups == {reload_: [write]}
    assert infra01.may_follow == [other, mount]
    assert f"{reload_} (after: {write})" in to_markdown(DriftReport(spec="lab", hosts=[infra01]))


# What pyinfra 3.10 logs for a host it could not connect to, one case per connector error.
CONNECT_ERRORS = [
    "Could not connect ([Errno None] Unable to connect to port 22 on 10.77.0.12)",
    "Could not resolve hostname ([Errno -2] Name or service not known)",
    "SSH host key error (Host key for 10.77.0.12 does not match.)",
    "SSH error (Error reading SSH protocol banner)",
    "Authentication error (username=deepfleet, key=/root/.ssh/deepfleet_lab)",
    "EOF error ()",
]


@pytest.mark.parametrize("error", CONNECT_ERRORS)
def test_host_that_failed_to_connect_is_unreachable_with_pyinfra_words(error: str) -> None:
    # pyinfra leaves the host out of its plan and exits 1; the others are planned.
    log = _log(["lb-01", "gpu-01", "infra-01"], f"    [gpu-02]  {error}")
    payload = {"plan": [_op("[timesync] Restart chrony", conditional=["gpu-01", "lb-01"])]}
    report = analyse(LAB, payload, log, returncode=1)
    assert report.unreachable == {"gpu-02": error}
    assert not report.complete and report.error is None
    assert [h.host for h in report.hosts] == ["lb-01", "gpu-01", "infra-01"]
    markdown = to_markdown(report)
    assert f"- gpu-02: {error}" in markdown
    assert "every host matches" not in markdown
    assert "No drift on: lb-01, gpu-01, infra-01" in markdown


def test_host_pyinfra_says_nothing_about_is_unreachable() -> None:
    # No error line to match (a message this code has never seen): absent from the plan and
    # never `Connected` is enough to count as not looked at.
    report = analyse(LAB, {"plan": []}, _log(["lb-01", "gpu-01", "gpu-02"]), returncode=0)
    assert report.unreachable == {"infra-01": "pyinfra did not connect to it"}


def test_no_host_left_means_no_plan_and_every_host_named() -> None:
    log = (
        "--> Connecting to hosts...\n"
        "    [gpu-01] Could not connect ([Errno None] Unable to connect to port 22 on 10.77.0.11)\n"
        "    [gpu-02] Could not resolve hostname ([Errno -2] Name or service not known)\n"
        "--> pyinfra error: No hosts remaining!\n"
    )
    report = analyse(LAB, None, log, returncode=1, scope=["gpu-01", "gpu-02"])
    assert set(report.unreachable) == {"gpu-01", "gpu-02"}
    assert report.hosts == [] and not report.drifted


def test_host_that_failed_while_planning_is_named() -> None:
    # Captured: a fact that cannot be read fails the host; with no host left, no plan.
    log = (
        "--> Connecting to hosts...\n"
        "    [gpu-01] Connected\n\n"
        "--> Preparing operation files...\n"
        "    Loading: deploy.py\n"
        "    [gpu-01] boom\n"
        "    [gpu-01] Error: could not load fact: server.Command command=echo boom >&2; false\n\n"
        "--> Disconnecting from hosts...\n"
        "--> pyinfra error in deploy.py line 5: No hosts remaining!\n"
    )
    report = analyse(LAB, None, log, returncode=1, scope=["gpu-01"])
    assert report.failed == {
        "gpu-01": "Error: could not load fact: server.Command command=echo boom >&2; false"
    }
    assert report.hosts == []


def test_nonzero_exit_naming_no_host_is_an_error_with_pyinfra_last_lines() -> None:
    payload = {"plan": [_op("[timesync] Restart chrony", conditional=["gpu-01"])]}
    log = CONNECTED + "\n--> pyinfra error: something went wrong late\n"
    report = analyse(LAB, payload, log, returncode=1)
    assert report.error is not None and "something went wrong late" in report.error
    assert not report.complete


def _fake_pyinfra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str, stderr: str, code: int
) -> None:
    """`run_dry` runs the pyinfra beside the interpreter: put a stand-in there."""
    (tmp_path / "out").write_text(stdout)
    (tmp_path / "err").write_text(stderr)
    tool = tmp_path / "pyinfra"
    tool.write_text(
        f'#!/bin/sh\necho "$@" > {tmp_path}/args\n'
        f"cat {tmp_path}/out\ncat {tmp_path}/err >&2\nexit {code}\n"
    )
    tool.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.delenv("DEEPFLEET_OUTPUTS", raising=False)


# Captured (abridged): the spec's key file is missing; pyinfra's connect greenlet raises.
MISSING_KEY = """--> Loading config...
--> Loading inventory...
--> Connecting to hosts...
Traceback (most recent call last):
  File "src/gevent/greenlet.py", line 912, in gevent._gevent_cgreenlet.Greenlet.run
  File ".../pyinfra/connectors/ssh_util.py", line 162, in load_key_with_certificate
    raise PyinfraError(f"No such private key file: {key_filename}")
pyinfra.api.exceptions.PyinfraError: No such private key file: /root/.ssh/deepfleet_ed25519
2026-11-24T00:31:33Z <Greenlet at 0x7f3dc0eb8220: <bound method Host.connect of Host(gpu-01)>> failed with PyinfraError

--> Disconnecting from hosts...
--> pyinfra error in src/gevent/greenlet.py line 912: No such private key file: /root/.ssh/deepfleet_ed25519
"""


def test_pyinfra_failing_without_plan_or_host_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_pyinfra(tmp_path, monkeypatch, "", MISSING_KEY, 1)
    with pytest.raises(UserError) as caught:
        run_dry("hosts/lab.yaml")
    problem = caught.value.problems[0]
    assert problem.message.startswith("--> pyinfra error in src/gevent/greenlet.py line 912:")
    assert "No such private key file" in problem.message
    assert problem.hint is not None and "Traceback" in problem.hint


def test_run_dry_keeps_the_exit_code_and_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = json.dumps({"plan": [_op("[x] Write /etc/x", change=["gpu-01"])], "results": None})
    _fake_pyinfra(tmp_path, monkeypatch, plan, CONNECTED, 1)
    run = run_dry("hosts/lab.yaml", ["gpu-01"])
    assert run.returncode == 1 and run.payload is not None and run.payload["plan"]
    assert "--limit gpu-01" in (tmp_path / "args").read_text()


def _args(**overrides: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "spec": str(HOSTS / "lab.yaml"),
        "json": None,
        "markdown": None,
        "limit": None,
        "stack": None,
        "refresh": False,
    }
    return argparse.Namespace(**{**values, **overrides})


def test_drift_command_exits_2_naming_the_unreachable_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _log(["lb-01", "gpu-01", "infra-01"], f"    [gpu-02]  {CONNECT_ERRORS[2]}")
    _fake_pyinfra(tmp_path, monkeypatch, json.dumps({"plan": []}), log, 1)
    out = tmp_path / "drift.json"
    with pytest.raises(UserError) as caught:
        drift_command.run(_args(json=out))
    rendered = caught.value.render()
    assert "host gpu-02 is unreachable: SSH host key error" in rendered
    report = json.loads(out.read_text())
    assert report["unreachable"] == {"gpu-02": CONNECT_ERRORS[2]} and not report["complete"]
    assert "gpu-02" in capsys.readouterr().out


def test_drift_command_prints_long_lines_unwrapped_and_exits_3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    long_change = "[sglang] Restart chat replica 1 (running container differs: " + "x" * 150 + ")"
    plan = {"plan": [_op(long_change, change=["gpu-01"])]}
    _fake_pyinfra(tmp_path, monkeypatch, json.dumps(plan), CONNECTED, 0)
    monkeypatch.delenv("COLUMNS", raising=False)
    assert drift_command.run(_args()) == 3
    assert f"- {long_change}\n" in capsys.readouterr().out


def test_refresh_needs_a_stack() -> None:
    with pytest.raises(UserError, match="--refresh needs --stack"):
        drift_command.run(_args(refresh=True))


def test_limit_must_name_nodes_or_groups() -> None:
    assert scope_of(LAB, ["gpu"]) == ["gpu-01", "gpu-02"]
    assert scope_of(LAB, ["lb-01"]) == ["lb-01"]
    with pytest.raises(UserError, match="--limit"):
        scope_of(LAB, ["gpu-9"])


def test_file_diffs_reach_cloud_nodes_through_saved_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # example-aws has no address in the spec; pyinfra and the diff read Pulumi's outputs.
    spec = load_spec(HOSTS / "example-aws.yaml")
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"node_addresses": {"gpu-01": "10.42.16.37"}}))
    monkeypatch.setenv("DEEPFLEET_OUTPUTS", str(outputs))
    path = next(
        f.path
        for node_plan in plan_cluster(spec)
        if node_plan.node.name == "gpu-01"
        for role in node_plan.roles
        for f in role.files
    )
    asked: list[tuple[str, str]] = []

    def fake_read(_spec: object, address: str, wanted: str) -> str:
        asked.append((address, wanted))
        return "edited by hand\n"

    monkeypatch.setattr(drift_module, "read_remote_file", fake_read)
    report = DriftReport(spec="aws", hosts=[HostDrift("gpu-01", changes=[f"[x] Write {path}"])])
    add_file_diffs(spec, report)
    assert asked == [("10.42.16.37", path)]
    assert "-edited by hand" in report.hosts[0].file_diffs[path]


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
    args = (tmp_path / "args").read_text()
    assert "--expect-no-changes" in args and "--refresh" not in args


def test_pulumi_stack_with_changes_is_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = "~ aws:ec2:Instance gpu-01 update; error: no changes were expected but changes were proposed"
    monkeypatch.setenv("PATH", f"{_fake_pulumi(tmp_path, 255, output)}:/usr/bin:/bin")
    result = pulumi_drift("prod")
    assert result.drifted
    assert result.changes == ["pulumi preview: the stack's resources differ from the program"]
    assert any("gpu-01" in diff for diff in result.file_diffs.values())


def test_pulumi_refresh_reads_the_cloud_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hand change in the console: only a refreshed preview sees it.
    output = "~ aws:ec2:Instance gpu-01 update [diff: ~instanceType]; error: no changes were expected but changes were proposed"
    monkeypatch.setenv("PATH", f"{_fake_pulumi(tmp_path, 255, output)}:/usr/bin:/bin")
    result = pulumi_drift("prod", refresh=True)
    args = (tmp_path / "args").read_text().split()
    assert args[:1] == ["preview"] and "--refresh" in args and "--expect-no-changes" in args
    assert result.changes == ["pulumi preview: the cloud's resources differ from the program"]
    assert any("instanceType" in diff for diff in result.file_diffs.values())


def test_pulumi_stack_without_the_cli_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="Pulumi CLI"):
        pulumi_drift("prod")
