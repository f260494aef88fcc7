"""`deepfleet diff --base REF [SPEC...]`: what a change does to each host, decided offline.

Renders everything the roles would write and run (files, units, engine commands, packages, the
Pulumi resource graph through mocks) for the base revision and for the working tree, and prints
the differences grouped by host and resource. Exit 0 when nothing differs, 3 when something does.
"""

from __future__ import annotations

import argparse
import difflib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from infra.errors import Problem, UserError
from infra.inventory import PROJECT_DIR
from infra.snapshot import Snapshot, take_snapshot
from infra.spec import load_spec

EXIT_CHANGED = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "diff", help="offline: what a change does to each host and resource (exit 3 if any)"
    )
    parser.add_argument("--base", required=True, metavar="GIT_REF", help="e.g. origin/main")
    parser.add_argument("specs", nargs="*", metavar="SPEC", help="default: every hosts/*.yaml")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write a PR comment")
    parser.set_defaults(func=run)


def _git(*args: str, cwd: Path = PROJECT_DIR) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise UserError(f"git {' '.join(args)} failed", [Problem(result.stderr.strip())])
    return result.stdout


def base_snapshot(base_tree: Path, spec: str) -> Snapshot:
    if not (base_tree / spec).exists():
        return {}  # the spec is new in this change
    # The base revision's own code renders the base revision's spec.
    result = subprocess.run(
        [sys.executable, "-m", "infra.snapshot", spec],
        cwd=base_tree,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(base_tree), "PATH": "/usr/bin:/bin"},
    )
    if result.returncode != 0:
        raise UserError(
            f"cannot render {spec} at the base revision",
            [Problem(result.stderr.strip()[-2000:] or "no output", file=spec)],
        )
    snapshot: Snapshot = json.loads(result.stdout)
    return snapshot


def compare(before: Snapshot, after: Snapshot) -> dict[str, dict[str, str]]:
    """host -> resource -> unified diff, for what was added, removed or changed."""
    changes: dict[str, dict[str, str]] = {}
    for host in sorted(set(before) | set(after)):
        old, new = before.get(host, {}), after.get(host, {})
        for resource in sorted(set(old) | set(new)):
            if old.get(resource) == new.get(resource):
                continue
            diff = difflib.unified_diff(
                (old.get(resource) or "").splitlines(keepends=True),
                (new.get(resource) or "").splitlines(keepends=True),
                fromfile=f"base:{resource}" if resource in old else "/dev/null",
                tofile=f"change:{resource}" if resource in new else "/dev/null",
            )
            changes.setdefault(host, {})[resource] = "".join(diff)
    return changes


def to_markdown(spec: str, changes: dict[str, dict[str, str]]) -> str:
    lines = [f"## `{spec}`", ""]
    if not changes:
        return "\n".join([*lines, "No change to any host or resource.", ""])
    for host, resources in changes.items():
        lines += [f"### {host}", ""]
        for resource, diff in resources.items():
            lines += [
                f"<details><summary>{resource}</summary>",
                "",
                "```diff",
                diff.rstrip(),
                "```",
            ]
            lines += ["</details>", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    specs = args.specs or sorted(
        str(p.relative_to(PROJECT_DIR)) for p in PROJECT_DIR.glob("hosts/*.yaml")
    )
    any_change = False
    reports: list[str] = []
    commit = _git("rev-parse", "--verify", f"{args.base}^{{commit}}").strip()
    with tempfile.TemporaryDirectory(prefix="deepfleet-diff-") as tmp:
        base_tree = Path(tmp) / "base"
        _git("worktree", "add", "--detach", str(base_tree), commit)
        try:
            for spec in specs:
                after = take_snapshot(load_spec(spec))
                before = base_snapshot(base_tree, spec)
                changes = compare(before, after)
                any_change = any_change or bool(changes)
                reports.append(to_markdown(spec, changes))
        finally:
            _git("worktree", "remove", "--force", str(base_tree))
    text = "\n".join(reports)
    # Plain text, not rich: rich wraps at 80 columns when piped (CI logs, `| less`), which
    # breaks the +/- lines of the diffs and hides what changed.
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
    if args.markdown:
        args.markdown.write_text(text)
    return EXIT_CHANGED if any_change else 0
