"""`deepfleet drift SPEC`: does every live host still match the repository?

Exit codes: 0 no drift, 3 drift found, 2 bad input, or a host whose drift is unknown (unreachable
or failed while pyinfra planned; named), or pyinfra failing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infra.drift import drift, to_markdown
from infra.errors import Problem, UserError
from infra.spec import load_spec

EXIT_DRIFT = 3
_UNREACHABLE_HINT = (
    "check its address (cloud nodes: DEEPFLEET_OUTPUTS), the SSH key and known_hosts, the network"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "drift", help="compare live hosts with the repository (pyinfra dry run); exit 3 on drift"
    )
    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write a PR-ready report")
    parser.add_argument(
        "--limit", action="append", metavar="NODE", help="only these nodes (or groups)"
    )
    parser.add_argument(
        "--stack", metavar="NAME", help="also `pulumi preview --expect-no-changes` this stack"
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="with --stack: read the cloud first (pulumi preview --refresh), to see hand changes",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.refresh and not args.stack:
        raise UserError(
            "--refresh needs --stack",
            [Problem("--refresh reads a Pulumi stack's resources", hint="add --stack NAME")],
        )
    spec = load_spec(args.spec)
    report = drift(spec, args.spec, args.limit, args.stack, args.refresh)
    markdown = to_markdown(report)
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown)
    # Plain text, not rich: rich wraps at 80 columns when piped, which breaks diff lines.
    sys.stdout.write(markdown)
    sys.stdout.flush()
    problems = [
        Problem(f"host {h} is unreachable: {why}", file=args.spec, hint=_UNREACHABLE_HINT)
        for h, why in report.unreachable.items()
    ]
    problems += [
        Problem(f"host {h} failed while pyinfra planned: {why}", file=args.spec)
        for h, why in report.failed.items()
    ]
    if report.error:
        problems.append(Problem(report.error, file=args.spec))
    if problems:
        raise UserError(
            "the drift of some hosts is unknown; the report above is incomplete", problems
        )
    return EXIT_DRIFT if report.drifted else 0
