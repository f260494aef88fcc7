"""Lab figures: rootfs build, node start and ssh readiness for 1, 4 and 8 nodes (needs root).

    sudo .venv/bin/python bench/lab.py [--sizes 1,4,8] [--deploy] [--cold] [--keep]

Replaces any running lab (it is torn down first). With --deploy, each size gets a spec of its
own (bench/fleet.py's generator: lb-01 and GPU nodes, one stand-in replica per GPU node; one
node is both) and the first and the no-op `pyinfra -y inventory.py deploy.py` are timed on it.
--cold removes the cached rootfs first, so its build is timed. Memory is the mean PSS of a
node's processes two seconds after all nodes answer ssh (page cache not included).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from bench.fleet import write_fleet_spec  # noqa: E402
from infra.errors import UserError  # noqa: E402
from infra.lab import (  # noqa: E402
    LabNode,
    LabPaths,
    LabPlan,
    RootfsRecipe,
    down,
    ensure_rootfs,
    plan_from_spec,
    preflight_problems,
    up,
)


def node_pss_kib(netns: str) -> int:
    """Proportional set size of every process of a node (shared pages split fairly)."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    total = 0
    for pid in pids.stdout.split():
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


def sized(plan: LabPlan, count: int) -> LabPlan:
    """The spec's nodes first; beyond them, extra GPU nodes numbered on from .30."""
    nodes = list(plan.nodes[:count])
    for index in range(count - len(nodes)):
        address = IPv4Address(int(plan.network.network_address) + 30 + index)
        nodes.append(LabNode(f"gpu-{index + 11:02d}", address, ("gpu",)))
    return dataclasses.replace(plan, nodes=tuple(nodes))


def timed_pyinfra(label: str, spec: Path) -> str:
    started = time.monotonic()
    result = subprocess.run(
        [str(PROJECT / ".venv/bin/pyinfra"), "-y", "inventory.py", "deploy.py"],
        cwd=PROJECT,
        env={**os.environ, "DEEPFLEET_SPEC": str(spec), "PYINFRA_PROGRESS": "off"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return f"{label}: failed after {seconds:.1f} s: {' | '.join(tail)}"
    return f"{label}: {seconds:.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--spec", default=str(PROJECT / "hosts/lab.yaml"))
    parser.add_argument("--deploy", action="store_true", help="also time pyinfra deploys")
    parser.add_argument("--cold", action="store_true", help="rebuild the rootfs (timed)")
    parser.add_argument("--keep", action="store_true", help="leave the last lab running")
    args = parser.parse_args()
    problems = preflight_problems()
    if problems:
        print("\n".join(p.message for p in problems), file=sys.stderr)
        return 2
    from infra.spec import load_spec

    os.chdir(PROJECT)
    paths = LabPaths(state=PROJECT / ".lab")
    base = plan_from_spec(load_spec(args.spec))
    print(f"host: {os.cpu_count()} cpus, kernel {os.uname().release}")

    recipe = RootfsRecipe()
    if args.cold:
        down(paths, [base.bridge])  # no node may run on the rootfs being removed
        shutil.rmtree(recipe.directory(paths.cache_root), ignore_errors=True)
    cached = recipe.directory(paths.cache_root).is_dir()
    rootfs = ensure_rootfs(paths.cache_root, recipe)
    if cached:
        print(f"rootfs: cached ({rootfs.path}); remove it to time a cold build")
    else:
        size = subprocess.run(["du", "-sm", str(rootfs.path)], capture_output=True, text=True)
        print(f"rootfs: built in {rootfs.seconds:.1f} s, {size.stdout.split()[0]} MB")

    down(paths, [base.bridge])
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"{'nodes':>5} {'start s':>8} {'all ssh s':>10} {'first ssh s':>12} {'MiB/node':>9}")
    specs = Path(tempfile.mkdtemp(prefix="deepfleet-bench-lab-"))
    for count in sizes:
        spec_path = write_fleet_spec(Path(args.spec), count, specs) if args.deploy else None
        plan = plan_from_spec(load_spec(spec_path)) if spec_path else sized(base, count)
        report = up(plan, paths)
        time.sleep(2)  # let the boot finish its last units before reading memory
        per_node = sum(node_pss_kib(n.netns) for n in plan.nodes) / 1024 / count
        first = min(report.ssh_ready.values())
        print(
            f"{count:>5} {report.start_seconds:>8.2f} {report.ssh_seconds:>10.2f} "
            f"{first:>12.2f} {per_node:>9.0f}"
        )
        if spec_path is not None:
            print("  " + timed_pyinfra("pyinfra first deploy", spec_path))
            print("  " + timed_pyinfra("pyinfra no-op deploy", spec_path))
        started = time.monotonic()
        if count != sizes[-1] or not args.keep:
            down(paths, [base.bridge])
            print(f"{'':>5} down in {time.monotonic() - started:.2f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(error.render(), file=sys.stderr)
        sys.exit(2)
