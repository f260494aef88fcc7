"""`deepfleet drift SPEC`: does every live host still match the repository?

Exit codes: 0 no drift, 3 drift found, 2 bad input or an unreachable host (named).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from infra.drift import drift, to_markdown
from infra.errors import Problem, UserError
from infra.spec import load_spec

EXIT_DRIFT = 3


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "drift", help="compare live hosts with the repository (pyinfra dry run); exit 3 on drift"
    )
    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write a PR-ready report")
    parser.add_argument("--limit", action="append", metavar="NODE", help="only these nodes")
    parser.add_argument(
        "--stack", metavar="NAME", help="also `pulumi preview --expect-no-changes` this stack"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    report = drift(spec, args.spec, args.limit, args.stack)
    markdown = to_markdown(report)
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown)
    Console().print(markdown, markup=False, highlight=False)
    if report.unreachable:
        raise UserError(
            "some hosts could not be reached; their drift is unknown",
            [
                Problem(f"host {h} is unreachable", hint="check its address, SSH key and network")
                for h in report.unreachable
            ],
        )
    return EXIT_DRIFT if report.drifted else 0
