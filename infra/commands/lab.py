"""`deepfleet lab up|status|ssh|down`: real multi-node test hosts on this machine (needs root)."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

from infra.errors import Problem, UserError
from infra.lab import LabPaths, LabPlan, down, load_state, plan_from_spec, ssh_argv, status, up

DEFAULT_SPEC = "hosts/lab.yaml"
STATE_COLOURS = {"running": "green", "booting": "yellow", "stopped": "red", "absent": "dim"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "lab", help="local lab nodes (network namespaces + systemd-nspawn; needs root)"
    )
    actions = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    start = actions.add_parser("up", help="start the lab's nodes (idempotent)")
    start.add_argument("--spec", default=DEFAULT_SPEC, help=f"lab spec (default {DEFAULT_SPEC})")
    start.add_argument(
        "--nodes",
        type=int,
        default=None,
        metavar="N",
        help="only the first N nodes (lb first, then gpu, then the rest)",
    )
    start.set_defaults(func=run_up)

    show = actions.add_parser("status", help="list the lab's nodes and endpoint")
    show.add_argument("--spec", default=DEFAULT_SPEC, help="used when no lab is recorded")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=run_status)

    shell = actions.add_parser("ssh", help="ssh into a node with the lab key: lab ssh NODE -- CMD")
    shell.add_argument("--spec", default=DEFAULT_SPEC, help="used when no lab is recorded")
    shell.add_argument("node", metavar="NODE")
    shell.add_argument("remote", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    shell.set_defaults(func=run_ssh)

    talk = actions.add_parser("chat", help="send one chat request through the lab's load balancer")
    talk.add_argument("--spec", default=DEFAULT_SPEC, help="used when no lab is recorded")
    talk.add_argument("message", nargs="?", default="Hello from deepfleet")
    talk.set_defaults(func=run_chat)

    stop = actions.add_parser("down", help="remove every node, mount, link and process")
    stop.add_argument("--spec", default=DEFAULT_SPEC, help="names the bridge to remove too")
    stop.set_defaults(func=run_down)


def _plan(spec_path: str, nodes: int | None = None) -> LabPlan:
    # Imported late: the lab commands that only read state work without the spec's deps.
    from infra.spec import load_spec

    spec = load_spec(spec_path)
    try:
        return plan_from_spec(spec, nodes)
    except UserError as error:
        # plan_from_spec knows spec paths, not the file: name it here.
        for problem in error.problems:
            problem.file = problem.file or spec_path
        raise


def _recorded_or_spec(paths: LabPaths, spec_path: str) -> LabPlan:
    state = load_state(paths.state_file)
    if state is not None:
        return state.plan
    return _plan(spec_path)


def run_up(args: argparse.Namespace) -> int:
    paths = LabPaths()
    plan = _plan(args.spec, args.nodes)
    console = Console(stderr=True)
    report = up(plan, paths, spec_path=args.spec, say=lambda text: console.print(text))
    if report.already_running:
        console.print(f"already running: {', '.join(report.already_running)}")
    if report.started:
        console.print(
            f"[green]up[/green]: {len(report.started)} node(s) started in "
            f"{report.start_seconds:.1f} s, all answering ssh after {report.ssh_seconds:.1f} s"
        )
    console.print(f"ssh: deepfleet lab ssh {plan.nodes[0].name} -- hostname")
    return 0


def status_document(plan: LabPlan, paths: LabPaths) -> dict[str, object]:
    state = load_state(paths.state_file)
    try:
        api_key: str | None = paths.api_key.read_text().strip()
    except OSError:
        api_key = None  # not created yet, or not readable by this user (it is mode 600)
    return {
        "nodes": [
            {"name": s.name, "address": s.address, "groups": list(s.groups), "state": s.state}
            for s in status(plan, state)
        ],
        "endpoint": plan.endpoint,
        "api_key": api_key,
        "ssh_key": str(paths.ssh_key),
    }


def run_status(args: argparse.Namespace) -> int:
    paths = LabPaths()
    plan = _recorded_or_spec(paths, args.spec)
    document = status_document(plan, paths)
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    table = Table(title=f"lab {plan.name!r} on bridge {plan.bridge} ({plan.host_interface})")
    for column in ("node", "address", "groups", "state"):
        table.add_column(column)
    nodes = document["nodes"]
    assert isinstance(nodes, list)
    for row in nodes:
        colour = STATE_COLOURS.get(row["state"], "white")
        table.add_row(
            row["name"],
            row["address"],
            ",".join(row["groups"]),
            f"[{colour}]{row['state']}[/{colour}]",
        )
    console = Console()
    console.print(table)
    console.print(f"endpoint: {document['endpoint'] or '(no lb node)'}")
    console.print(f"ssh key:  {document['ssh_key']}   api key: {paths.api_key}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """One OpenAI-style chat completion through the load balancer, as a client would send it."""
    paths = LabPaths()
    plan = _recorded_or_spec(paths, args.spec)
    endpoint = status_document(plan, paths)["endpoint"]
    if not endpoint:
        raise UserError("the lab has no load balancer node", [])
    from infra.spec import load_spec

    spec = load_spec(args.spec)
    model = spec.deployments[0].model if spec.deployments else "default"
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": args.message}]}
    ).encode()
    request = urllib.request.Request(
        f"{endpoint}/v1/chat/completions",
        data=body,
        headers={
            "Authorization": f"Bearer {paths.api_key.read_text().strip()}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, OSError) as error:
        raise UserError(
            f"no answer from {endpoint}",
            [Problem(str(error), hint="is the lab deployed? `pyinfra inventory.py deploy.py`")],
        ) from None
    Console().print(
        f"POST {endpoint}/v1/chat/completions -> {answer['choices'][0]['message']['content']}",
        markup=False,
        highlight=False,
    )
    return 0


def run_ssh(args: argparse.Namespace) -> int:
    paths = LabPaths()
    if not paths.ssh_key.exists():
        raise UserError("the lab has no ssh key yet", [])
    plan = _recorded_or_spec(paths, args.spec)
    remote = list(args.remote)
    if remote[:1] == ["--"]:
        remote = remote[1:]
    argv = ssh_argv(plan, paths, args.node, remote)
    # ssh's own exit status (255 for connection errors) is the command's.
    return subprocess.call(argv)


def run_down(args: argparse.Namespace) -> int:
    paths = LabPaths()
    bridges: list[str] = []
    if Path(args.spec).exists():
        # A broken spec must not stop the clean-up; the name prefixes still find the rest.
        with contextlib.suppress(UserError):
            bridges.append(_plan(args.spec).bridge)
    console = Console(stderr=True)
    down(paths, bridges, say=lambda text: console.print(text))
    console.print("[green]down[/green]: no lab namespace, link, mount or process left")
    return 0
