"""`deepfleet plan SPEC [--out DIR]`: what every node will run, decided offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from infra.plan import plan_cluster, write_plan
from infra.spec import GROUPS, load_spec


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "plan", help="show what each node will run and render its files (no network)"
    )
    parser.add_argument("spec", metavar="SPEC", help="spec file, e.g. hosts/example-baremetal.yaml")
    parser.add_argument("--out", type=Path, help="write every rendered file under DIR/<host>/")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    spec = load_spec(args.spec)
    plans = plan_cluster(spec)

    groups = Table(title=f"cluster {spec.name} ({spec.provider.kind})")
    groups.add_column("group")
    groups.add_column("nodes")
    for group in GROUPS:
        groups.add_row(group, ", ".join(n.name for n in spec.nodes_in(group)) or "-")
    console.print(groups)

    for node_plan in plans:
        node = node_plan.node
        table = Table(
            title=f"{node.name} ({node.address or 'address from Pulumi'})", title_justify="left"
        )
        table.add_column("role")
        table.add_column("will do")
        table.add_column("files", justify="right")
        for role in node_plan.roles:
            what = (
                f"[yellow]skipped: {role.skipped}[/yellow]"
                if role.skipped
                else "; ".join(role.summary)
            )
            table.add_row(role.role, what, str(len(role.files)))
        console.print(table)

    for extra in _extra_sections(spec):
        console.print(extra)

    if args.out:
        written = write_plan(plans, args.out)
        console.print(f"wrote {len(written)} files under {args.out}/")
    return 0


def _extra_sections(spec: object) -> list[object]:
    # Sizing and the Pulumi resource graph join the plan here as those modules land.
    return []
