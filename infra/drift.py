"""Drift: what a deploy would change on live hosts, from pyinfra's own dry run.

`pyinfra inventory.py deploy.py --dry --json` decides, per operation, which hosts would change
for certain and which only "conditionally" (operations gated with `_if` on another change, such
as a restart). A host drifts only when it has a definite change; its conditional operations are
listed as the follow-ups those changes would trigger. For every drifted file the report shows a
unified diff between the node's copy and the one the plan renders.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import Problem, UserError
from infra.inventory import PROJECT_DIR, SPEC_VARIABLE, connection_data
from infra.plan import plan_cluster
from infra.spec import ClusterSpec

WRITE_OP = re.compile(r"^\[(?P<role>[\w-]+)\] Write (?P<path>/\S+)$")
ROLE_OF_OP = re.compile(r"^\[(?P<role>[\w-]+)\]")
UNREACHABLE = re.compile(
    r"\[(?P<host>[\w.-]+)\].*(Could not connect|Authentication error|EOF error)"
)


@dataclass
class HostDrift:
    host: str
    changes: list[str] = field(default_factory=list)
    # follow-up operation -> the definite changes (same role) that would trigger it
    follow_ups: dict[str, list[str]] = field(default_factory=dict)
    file_diffs: dict[str, str] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return bool(self.changes)


@dataclass
class DriftReport:
    spec: str
    hosts: list[HostDrift]
    unreachable: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return any(h.drifted for h in self.hosts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "drifted": self.drifted,
            "unreachable": self.unreachable,
            "hosts": [{**asdict(h), "drifted": h.drifted} for h in self.hosts],
        }


def run_dry(spec_path: str, limit: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """Run pyinfra's dry run for the spec; return its JSON plan and its log (stderr).

    When no host could be reached pyinfra prints no plan: the plan is then empty and the log
    names the hosts.
    """
    command = [
        str(Path(sys.executable).parent / "pyinfra"),
        "--dry",
        "--json",
        "inventory.py",
        "deploy.py",
    ]
    for host in limit or []:
        command += ["--limit", host]
    env = {**os.environ, SPEC_VARIABLE: spec_path, "PYINFRA_PROGRESS": "off"}
    result = subprocess.run(
        command, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode == 2 and "error:" in result.stderr and not result.stdout.strip():
        # inventory.py printed a spec error and exited 2.
        raise UserError("the spec is invalid", [Problem(result.stderr.strip(), file=spec_path)])
    try:
        start = result.stdout.index("{")
        payload: dict[str, Any] = json.loads(result.stdout[start:])
    except ValueError:
        if UNREACHABLE.search(result.stderr):
            return {"plan": []}, result.stderr
        raise UserError(
            "pyinfra's dry run failed",
            [Problem((result.stderr or result.stdout).strip()[-3000:], file=spec_path)],
        ) from None
    return payload, result.stderr


def _short(name: str) -> str:
    # pyinfra prefixes operations inside a @deploy with the deploy's name: "timesync | [...] ..."
    return name.split(" | ", 1)[-1]


def _name_for_host(operation: dict[str, Any], tokens: set[str]) -> str:
    """pyinfra merges the same call site across hosts into one operation whose `names` holds
    every host's name (e.g. one engine unit per node); pick the one about this host."""
    names = [_short(n) for n in operation.get("names") or [operation["name"]]]
    if len(names) == 1:
        return names[0]
    mine = [n for n in names if any(token in n for token in tokens)]
    return mine[0] if len(mine) == 1 else " / ".join(names)


def _host_tokens(spec: ClusterSpec) -> dict[str, set[str]]:
    """What identifies a host's own operations: its planned file paths and unit names."""
    tokens: dict[str, set[str]] = {}
    for node_plan in plan_cluster(spec):
        paths = {f.path for role in node_plan.roles for f in role.files}
        units = {Path(p).stem for p in paths if p.startswith("/etc/systemd/system/")}
        tokens[node_plan.node.name] = paths | {u for u in units if u} | {f"{node_plan.node.name}:"}
    return tokens


def analyse(spec: ClusterSpec, payload: dict[str, Any], log: str) -> DriftReport:
    hosts = {node.name: HostDrift(node.name) for node in spec.nodes}
    tokens = _host_tokens(spec)
    conditional: dict[str, list[str]] = {}
    for operation in payload.get("plan", []):
        for host in operation.get("hosts_with_change", []):
            hosts[host].changes.append(_name_for_host(operation, tokens.get(host, set())))
        for host in operation.get("hosts_with_conditional_change", []):
            name = _name_for_host(operation, tokens.get(host, set()))
            conditional.setdefault(host, []).append(name)
    for host, names in conditional.items():
        drift = hosts[host]
        for name in names:
            role = _role_of(name)
            triggers = [c for c in drift.changes if _role_of(c) == role]
            if triggers:
                drift.follow_ups[name] = triggers
    unreachable = sorted({m.group("host") for m in UNREACHABLE.finditer(log)} & set(hosts))
    return DriftReport(spec="", hosts=list(hosts.values()), unreachable=unreachable)


def _role_of(operation: str) -> str | None:
    match = ROLE_OF_OP.match(operation)
    return match.group("role") if match else None


def add_file_diffs(spec: ClusterSpec, report: DriftReport) -> None:
    """Show, for each drifted file, how the node's copy differs from the planned one."""
    planned = {
        node_plan.node.name: {f.path: f.content for r in node_plan.roles for f in r.files}
        for node_plan in plan_cluster(spec)
    }
    for drift in report.hosts:
        node = spec.node(drift.host)
        for change in drift.changes:
            match = WRITE_OP.match(change)
            if not match or node.address is None:
                continue
            path = match.group("path")
            desired = planned.get(drift.host, {}).get(path)
            if desired is None:
                continue
            current = read_remote_file(spec, str(node.address), path)
            drift.file_diffs[path] = unified_diff(current, desired, path)


def unified_diff(current: str | None, desired: str, path: str) -> str:
    if current is None:
        return f"(missing on the node: {path} would be created)"
    lines = difflib.unified_diff(
        current.splitlines(keepends=True),
        desired.splitlines(keepends=True),
        fromfile=f"node:{path}",
        tofile=f"spec:{path}",
    )
    return "".join(lines) or "(same content; owner or mode differs)"


def read_remote_file(spec: ClusterSpec, address: str, path: str) -> str | None:
    data = connection_data(spec, address)
    command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(data["ssh_port"])]
    if "ssh_key" in data:
        command += ["-i", data["ssh_key"]]
    if data.get("ssh_known_hosts_file") == "/dev/null":
        command += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    command += ["-o", "LogLevel=ERROR", f"{data['ssh_user']}@{address}"]
    reader = f"cat {shlex.quote(path)}"
    command.append(f"sudo -n {reader}" if data.get("_sudo") else reader)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return result.stdout if result.returncode == 0 else None


def drift(
    spec: ClusterSpec, spec_path: str, limit: list[str] | None = None, stack: str | None = None
) -> DriftReport:
    payload, log = run_dry(spec_path, limit)
    report = analyse(spec, payload, log)
    report.spec = spec_path
    if limit:
        report.hosts = [h for h in report.hosts if h.host in limit]
    add_file_diffs(spec, report)
    if stack:
        report.hosts.append(pulumi_drift(stack))
    return report


def pulumi_drift(stack: str) -> HostDrift:
    """Cloud resources: `pulumi preview --expect-no-changes` fails when the stack would change."""
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise UserError(
            "--stack needs the Pulumi CLI",
            [
                Problem(
                    "`pulumi` is not on PATH", hint="install it (docs/pulumi.md) or drop --stack"
                )
            ],
        )
    result = subprocess.run(
        [pulumi, "preview", "--stack", stack, "--expect-no-changes", "--non-interactive", "--diff"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    drift = HostDrift(host=f"pulumi stack {stack}")
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        if "changes were proposed" not in output and "no changes were expected" not in output:
            raise UserError(f"pulumi preview failed for stack {stack}", [Problem(output[-3000:])])
        drift.changes.append("pulumi preview: the stack's resources differ from the program")
        drift.file_diffs["pulumi preview --diff"] = output[-20000:]
    return drift


def _brief(operation: str, limit: int = 90) -> str:
    return operation if len(operation) <= limit else operation[: limit - 1] + "…"


def to_markdown(report: DriftReport) -> str:
    lines = [f"## Drift report: `{report.spec}`", ""]
    if report.unreachable:
        lines += [f"**Unreachable:** {', '.join(report.unreachable)}", ""]
    if not report.drifted:
        lines.append("No drift: every reachable host matches the repository.")
        return "\n".join(lines) + "\n"
    for host in report.hosts:
        if not host.drifted:
            continue
        lines += [f"### {host.host}", "", "Would change:"]
        lines += [f"- {change}" for change in host.changes]
        if host.follow_ups:
            lines += ["", "Follow-ups these changes would trigger:"]
            for follow_up, triggers in host.follow_ups.items():
                after = "; ".join(_brief(t) for t in triggers)
                lines.append(f"- {_brief(follow_up)} (after: {after})")
        for path, diff in host.file_diffs.items():
            lines += ["", f"<details><summary><code>{path}</code></summary>", "", "```diff"]
            lines += [diff.rstrip("\n"), "```", "</details>"]
        lines.append("")
    clean = [h.host for h in report.hosts if not h.drifted]
    if clean:
        lines.append(f"No drift on: {', '.join(clean)}")
    return "\n".join(lines) + "\n"
