"""`deepfleet check SPEC [--node NAME] [--json]`: is each node, and the serving path, healthy?

Exit codes: 0 every check passed (or is not applicable), 1 a check failed, 2 bad input or a node
unreachable over SSH. See docs/monitoring.md.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from infra.acceptance.verdict import Status, Verdict
from infra.check import Options, Report, check_cluster
from infra.spec import load_spec

STYLE = {Status.PASS: "green", Status.FAIL: "bold red", Status.NOT_APPLICABLE: "dim"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check nodes (GPUs, driver, NVLink, IB, clock, DNS, model files) and serving",
        description="Read-only health checks over SSH, with a verdict per node.",
    )
    parser.add_argument("spec", metavar="SPEC", help="cluster spec, e.g. hosts/lab.yaml")
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME",
        help="check only this node (repeatable); skips the serving checks",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--burnin",
        action="store_true",
        help="also run the GPU burn-in in the engine image on each node, then the all-reduce "
        "across the nodes of each multi-node replica (loads every GPU: not on serving nodes)",
    )
    parser.add_argument(
        "--skip-checksums",
        action="store_true",
        help="do not run sha256sum -c over the model manifests (hundreds of GB on R1)",
    )
    parser.add_argument(
        "--skip-serving", action="store_true", help="no /health_generate, chat or load test"
    )
    parser.add_argument(
        "--dns-name",
        action="append",
        default=[],
        metavar="NAME",
        help="names every node must resolve (default: the cluster's node names)",
    )
    parser.set_defaults(func=run)


def _table(verdict: Verdict) -> Table:
    status = verdict.status
    table = Table(
        title=f"{verdict.node}: [{STYLE[status]}]{status.value.upper()}[/]",
        title_justify="left",
        show_edge=False,
    )
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("details")
    for check in verdict.checks:
        table.add_row(check.name, f"[{STYLE[check.status]}]{check.status.value}[/]", check.message)
    return table


def render(report: Report, console: Console) -> None:
    for verdict in report.nodes:
        console.print(_table(verdict))
        console.print()
    for node, reason in report.unreachable.items():
        console.print(f"[bold red]{node}: UNREACHABLE[/] {reason}")
    for verdict in report.replicas:
        console.print(_table(verdict))
        console.print()
    if report.serving is not None:
        console.print(_table(report.serving))
    word = {0: "[green]all checks passed[/]", 1: "[bold red]checks failed[/]"}
    console.print(word.get(report.exit_code, "[bold red]nodes unreachable[/]"))


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    options = Options(
        nodes=tuple(args.node),
        burnin=args.burnin,
        serving=not args.skip_serving,
        verify_checksums=not args.skip_checksums,
        dns_names=tuple(args.dns_name),
    )
    report = check_cluster(spec, options)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        render(report, Console())
    return report.exit_code
