"""`deepfleet plan SPEC [--out DIR]`: what every node will run, decided offline."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from infra.plan import plan_cluster, write_plan
from infra.pulumi_graph import render_tree, resource_graph
from infra.spec import GROUPS, ClusterSpec, load_spec
from infra.spec_fit import replica_sizing


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
            what = "; ".join(role.summary)
            if role.skipped:
                # Still say what production would do: the lab's plan documents the real path.
                what = f"[yellow]skipped: {role.skipped}[/yellow]" + (
                    f" (production: {what})" if what else ""
                )
            table.add_row(role.role, what, str(len(role.files)))
        console.print(table)

    for extra in _extra_sections(spec):
        console.print(extra)
    if spec.provider.kind != "lab":
        rows = resource_graph(spec)
        console.print(f"Pulumi stack resources ({len(rows)}, from the program under mocks):")
        for line in render_tree(rows):
            console.print(f"  {line}", markup=False, highlight=False)

    if args.out:
        written = write_plan(plans, args.out)
        console.print(f"wrote {len(written)} files under {args.out}/")
    return 0


def _extra_sections(spec: ClusterSpec) -> list[Table]:
    sizing = Table(title="sizing (deepfleet size)", title_justify="left")
    for column in ("deployment", "replica", "verdict", "per GPU", "KV tokens", "mem fraction"):
        sizing.add_column(column)
    for deployment in spec.deployments:
        for r, replica in enumerate(deployment.replicas, start=1):
            report = replica_sizing(spec, deployment, replica)
            if report is None:
                why = "lab: stand-in engine" if spec.is_lab else "model not in the catalog"
                sizing.add_row(deployment.name, str(r), f"not sized ({why})", "-", "-", "-")
                continue
            sizing.add_row(
                deployment.name,
                f"{r} ({', '.join(replica)})",
                "fits" if report.fits else "DOES NOT FIT",
                f"{report.per_gpu_required_gb:.1f} / {report.gpu_memory_gb:.1f} GB",
                f"{report.kv_cache_tokens:,}",
                f"{report.recommended.mem_fraction_static:.2f}",
            )
    return [sizing] if spec.deployments else []
