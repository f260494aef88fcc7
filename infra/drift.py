"""Drift: what a deploy would change on live hosts, from pyinfra's own dry run.

`pyinfra inventory.py deploy.py --dry --json` decides, per operation, which hosts would change
for certain and which only "conditionally" (operations gated with `_if` on another change, such
as a restart). A host drifts only when it has a definite change. Its conditional operations are
follow-ups: one is tied to a definite change only when its name says it runs after that change's
file changed; the others of a changed role are listed as "may run", because pyinfra's plan does
not say what gates them.
For every drifted file the report shows a unified diff between the node's copy and the one the
plan renders.

A host that pyinfra did not connect to, or that failed while pyinfra planned, is an error, never
"no drift": pyinfra leaves such hosts out of its plan, so an absent host proves nothing.
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
from pathlib import Path, PurePosixPath
from typing import Any

from infra.errors import Problem, UserError
from infra.inventory import PROJECT_DIR, SPEC_VARIABLE, connection_data, node_addresses
from infra.plan import plan_cluster
from infra.spec import ClusterSpec

WRITE_OP = re.compile(r"^\[(?P<role>[\w-]+)\] Write (?P<path>/\S+)$")
ROLE_OF_OP = re.compile(r"^\[(?P<role>[\w-]+)\]")
# pyinfra logs each host's progress as `    [host] message` on stderr (colours are dropped when
# stderr is not a terminal; ANSI is stripped anyway in case a wrapper forces them).
HOST_LINE = re.compile(r"^\s*\[(?P<host>[^\]\s]+)\]\s+(?P<message>\S.*)$", re.M)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What pyinfra logs for a host whose fact or operation failed while it planned (`Error: ...`,
# `Error (ignored)` is a warning and does not fail the host).
HOST_ERROR = re.compile(r"^Error(?! \(ignored)")
# How a follow-up names its trigger: "Restart x after /etc/x.conf changed".
AFTER_CHANGED = re.compile(r"\bafter (?P<what>.+?) changed\b")
# pyinfra's one-line summary of a failure that stopped it: "--> pyinfra error in X: why".
PYINFRA_ERROR = re.compile(r"^--> pyinfra error\b.*$", re.M)
LAST_LINES = 3000


@dataclass
class HostDrift:
    host: str
    changes: list[str] = field(default_factory=list)
    # follow-up operation -> the definite changes its name says trigger it
    follow_ups: dict[str, list[str]] = field(default_factory=dict)
    # conditional operations of a changed role whose trigger pyinfra's plan does not name
    may_follow: list[str] = field(default_factory=list)
    file_diffs: dict[str, str] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return bool(self.changes)


@dataclass
class DriftReport:
    spec: str
    hosts: list[HostDrift]
    # host -> why its drift is unknown: not connected, or failed while pyinfra planned
    unreachable: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # pyinfra failed without naming a host (its last lines)
    error: str | None = None

    @property
    def drifted(self) -> bool:
        return any(h.drifted for h in self.hosts)

    @property
    def complete(self) -> bool:
        """Whether every host in scope was looked at."""
        return not (self.unreachable or self.failed or self.error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "drifted": self.drifted,
            "complete": self.complete,
            "unreachable": self.unreachable,
            "failed": self.failed,
            "error": self.error,
            "hosts": [{**asdict(h), "drifted": h.drifted} for h in self.hosts],
        }


@dataclass(frozen=True)
class DryRun:
    """pyinfra's dry run: its JSON plan (None when it printed none), its log, its exit code."""

    payload: dict[str, Any] | None
    log: str
    returncode: int


def run_dry(spec_path: str, limit: list[str] | None = None) -> DryRun:
    """Run pyinfra's dry run for the spec. pyinfra exits 1 when a host failed (to connect or
    while planning) and prints no plan when no host is left; `analyse` names those hosts."""
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
    log = ANSI.sub("", result.stderr)
    if result.returncode == 2 and "error:" in log and not result.stdout.strip():
        # inventory.py printed a spec error (or a missing cloud address) and exited 2.
        raise UserError(
            "pyinfra could not load the spec's inventory", [Problem(log.strip(), file=spec_path)]
        )
    try:
        start = result.stdout.index("{")
        payload: dict[str, Any] | None = json.loads(result.stdout[start:])
    except ValueError:
        payload = None
    if payload is None and not HOST_LINE.search(log):
        # No plan and no word about any host: pyinfra itself failed (a deploy error, a missing
        # key file, a crash). Its own summary line first, then its last lines.
        summary = PYINFRA_ERROR.findall(log)
        raise UserError(
            f"pyinfra's dry run failed (exit {result.returncode}) and printed no plan",
            [
                Problem(
                    summary[-1] if summary else "pyinfra printed no summary",
                    file=spec_path,
                    hint="pyinfra's last lines:\n" + _last_lines(log or result.stdout),
                )
            ],
        )
    return DryRun(payload, log, result.returncode)


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


def scope_of(spec: ClusterSpec, limit: list[str] | None) -> list[str]:
    """The nodes a run looks at: all, or those `--limit` names (by node or group name)."""
    if not limit:
        return [n.name for n in spec.nodes]
    known = {n.name for n in spec.nodes} | {g for n in spec.nodes for g in n.groups}
    unknown = [name for name in limit if name not in known]
    if unknown:
        raise UserError(
            "--limit names no node or group of the spec",
            [
                Problem(
                    f"unknown: {', '.join(unknown)}",
                    hint=f"nodes: {', '.join(n.name for n in spec.nodes)}",
                )
            ],
        )
    return [n.name for n in spec.nodes if n.name in limit or set(n.groups) & set(limit)]


def _host_messages(log: str) -> dict[str, list[str]]:
    messages: dict[str, list[str]] = {}
    for match in HOST_LINE.finditer(ANSI.sub("", log)):
        messages.setdefault(match.group("host"), []).append(match.group("message").strip())
    return messages


def _last_lines(log: str) -> str:
    return log.strip()[-LAST_LINES:] or "no output"


def analyse(
    spec: ClusterSpec,
    payload: dict[str, Any] | None,
    log: str,
    returncode: int = 0,
    scope: list[str] | None = None,
) -> DriftReport:
    """Read pyinfra's plan and log. Every host in scope must show up as connected (its
    `Connected` log line, or a place in the plan); one that does not is unreachable, named with
    pyinfra's last word about it."""
    in_scope = scope if scope is not None else [n.name for n in spec.nodes]
    hosts = {name: HostDrift(name) for name in in_scope}
    tokens = _host_tokens(spec)
    conditional: dict[str, list[str]] = {}
    planned: set[str] = set()
    for operation in (payload or {}).get("plan", []):
        for host in operation.get("hosts_with_change", []):
            planned.add(host)
            if host in hosts:
                hosts[host].changes.append(_name_for_host(operation, tokens.get(host, set())))
        for host in operation.get("hosts_with_conditional_change", []):
            planned.add(host)
            name = _name_for_host(operation, tokens.get(host, set()))
            conditional.setdefault(host, []).append(name)
    for host, names in conditional.items():
        if host in hosts:
            _attach_follow_ups(hosts[host], names)

    messages = _host_messages(log)
    connected = planned | {
        host for host, said in messages.items() if any(m.startswith("Connected") for m in said)
    }
    report = DriftReport(spec="", hosts=list(hosts.values()))
    for host in in_scope:
        said = messages.get(host, [])
        errors = [m for m in said if HOST_ERROR.match(m)]
        if host not in connected:
            report.unreachable[host] = said[-1] if said else "pyinfra did not connect to it"
        elif returncode != 0 and errors:
            report.failed[host] = errors[-1]
        elif payload is None:
            report.failed[host] = f"pyinfra printed no plan (exit {returncode})"
    if (payload is None and report.failed) or (returncode != 0 and report.complete):
        # pyinfra exits 1 only when a host failed. When it names none, or connected hosts got
        # no plan, its own last lines are the best account of what happened.
        report.error = f"pyinfra exited {returncode}:\n{_last_lines(log)}"
    unknown = set(report.unreachable) | set(report.failed)
    report.hosts = [h for h in report.hosts if h.host not in unknown]
    return report


def _names_the_trigger(follow_up: str, change: str) -> bool:
    """Whether the follow-up's name says it runs after the file this change writes changed
    ("Reload systemd after mnt-models.mount changed" after "Write /etc/systemd/system/
    mnt-models.mount"): the only tie between the two that pyinfra's plan lets us state."""
    write = WRITE_OP.match(change)
    clause = AFTER_CHANGED.search(follow_up)
    if not write or not clause:
        return False
    path = write.group("path")
    return any(
        re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w.-])", clause.group("what"))
        for name in (path, PurePosixPath(path).name)
    )


def _attach_follow_ups(drift: HostDrift, conditional: list[str]) -> None:
    changed_roles = {_role_of(c) for c in drift.changes}
    for name in conditional:
        triggers = [c for c in drift.changes if _names_the_trigger(name, c)]
        if triggers:
            drift.follow_ups[name] = triggers
        elif _role_of(name) in changed_roles:
            # Roles gate follow-ups on their own operations, so one may run; which change
            # gates it is not in the plan, and claiming one would be a guess.
            drift.may_follow.append(name)


def _role_of(operation: str) -> str | None:
    match = ROLE_OF_OP.match(operation)
    return match.group("role") if match else None


def add_file_diffs(spec: ClusterSpec, report: DriftReport) -> None:
    """Show, for each drifted file, how the node's copy differs from the planned one."""
    planned = {
        node_plan.node.name: {f.path: f.content for r in node_plan.roles for f in r.files}
        for node_plan in plan_cluster(spec)
    }
    # Cloud nodes have no address in the spec: theirs come from DEEPFLEET_OUTPUTS, as pyinfra's.
    addresses = node_addresses(spec)
    for drift in report.hosts:
        address = addresses.get(drift.host)
        for change in drift.changes:
            match = WRITE_OP.match(change)
            if not match or address is None:
                continue
            path = match.group("path")
            desired = planned.get(drift.host, {}).get(path)
            if desired is None:
                continue
            current = read_remote_file(spec, address, path)
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
    spec: ClusterSpec,
    spec_path: str,
    limit: list[str] | None = None,
    stack: str | None = None,
    refresh: bool = False,
) -> DriftReport:
    scope = scope_of(spec, limit)
    run = run_dry(spec_path, limit)
    report = analyse(spec, run.payload, run.log, run.returncode, scope)
    report.spec = spec_path
    add_file_diffs(spec, report)
    if stack:
        report.hosts.append(pulumi_drift(stack, refresh))
    return report


def pulumi_drift(stack: str, refresh: bool = False) -> HostDrift:
    """Cloud resources: `pulumi preview --expect-no-changes` fails when the stack would change.

    Without `refresh` Pulumi compares the program with its state file only; `--refresh` reads
    every resource from the cloud first (without writing the state), so a change made by hand
    in the console shows up as the update that would revert it."""
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
    command = [pulumi, "preview", "--stack", stack, "--expect-no-changes", "--non-interactive"]
    command += ["--diff", *(["--refresh"] if refresh else [])]
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, check=False)
    drift = HostDrift(host=f"pulumi stack {stack}")
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        if "changes were proposed" not in output and "no changes were expected" not in output:
            raise UserError(f"pulumi preview failed for stack {stack}", [Problem(output[-3000:])])
        what = "the cloud's resources" if refresh else "the stack's resources"
        drift.changes.append(f"pulumi preview: {what} differ from the program")
        drift.file_diffs["pulumi " + " ".join(command[1:])] = output[-20000:]
    return drift


def _brief(operation: str, limit: int = 90) -> str:
    return operation if len(operation) <= limit else operation[: limit - 1] + "…"


def to_markdown(report: DriftReport) -> str:
    lines = [f"## Drift report: `{report.spec}`", ""]
    if report.unreachable:
        lines += ["**Unreachable (drift unknown):**", ""]
        lines += [f"- {host}: {why}" for host, why in report.unreachable.items()]
        lines.append("")
    if report.failed:
        lines += ["**Failed while pyinfra planned (drift unknown):**", ""]
        lines += [f"- {host}: {why}" for host, why in report.failed.items()]
        lines.append("")
    if report.error:
        lines += ["**pyinfra failed:**", "", "```", report.error, "```", ""]
    if not report.drifted:
        if report.complete:
            lines.append("No drift: every host matches the repository.")
        elif report.hosts:
            lines.append(f"No drift on: {', '.join(h.host for h in report.hosts)}")
        return "\n".join(lines) + "\n"
    for host in report.hosts:
        if not host.drifted:
            continue
        lines += [f"### {host.host}", "", "Would change:"]
        lines += [f"- {change}" for change in host.changes]
        if host.follow_ups:
            lines += ["", "Follow-ups these changes trigger:"]
            for follow_up, triggers in host.follow_ups.items():
                after = "; ".join(_brief(t) for t in triggers)
                lines.append(f"- {_brief(follow_up)} (after: {after})")
        if host.may_follow:
            lines += [
                "",
                "May also run (gated on a change in their role; the plan does not say which):",
            ]
            lines += [f"- {_brief(name)}" for name in host.may_follow]
        for path, diff in host.file_diffs.items():
            lines += ["", f"<details><summary><code>{path}</code></summary>", "", "```diff"]
            lines += [diff.rstrip("\n"), "```", "</details>"]
        lines.append("")
    clean = [h.host for h in report.hosts if not h.drifted]
    if clean:
        lines.append(f"No drift on: {', '.join(clean)}")
    return "\n".join(lines) + "\n"
