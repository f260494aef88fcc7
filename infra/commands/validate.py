"""`deepfleet validate SPEC...`: check cluster specs without touching any host."""

from __future__ import annotations

import argparse

from rich.console import Console

from infra.spec import load_spec


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("validate", help="check cluster spec files (offline)")
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="spec files, e.g. hosts/lab.yaml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    for path in args.specs:
        spec = load_spec(path)
        deployments = ", ".join(d.name for d in spec.deployments) or "none"
        console.print(
            f"[green]ok[/green] {path}: cluster {spec.name!r}, {len(spec.nodes)} nodes, "
            f"deployments: {deployments}"
        )
    return 0
