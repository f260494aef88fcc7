"""Fleet-scale timings: deepfleet's deploy, no-op re-deploy and drift check against Ansible.

    sudo .venv/bin/python bench/fleet.py --nodes 4,8,16 --runs 3 [--first-runs 1] [--json FILE]

For each size N the lab gets lb-01 and gpu-01..gpu-(N-1), generated from hosts/lab.yaml's lab
settings into a temporary spec (one chat replica per GPU node, the LB node serving time). Then:

1. deepfleet first deploy (`pyinfra -y inventory.py deploy.py`) on fresh nodes (`lab down`,
   `lab up` before each run), then the no-op re-deploy and `deepfleet drift` (no drift expected),
   and one extra no-op run under the profiler (not timed; see `--profile-pyinfra`);
2. Ansible (ansible-core in /var/tmp/deepfleet-bench/venv-ansible, created on first use) on the
   same converged nodes: one untimed apply, which must change nothing but python3-apt (the files
   are rendered by deepfleet's own plan), then `--check --diff` and the no-op apply, with
   forks=N and (above 5 nodes) Ansible's default forks=5;
3. Ansible's first apply on fresh nodes, with both fork counts (`--skip-ansible-first`).

Every command's wall time, its exit status and the peak RSS of the controller's largest
process (wait4's rusage: RUSAGE_CHILDREN of that command) are recorded. Replaces a running
lab, and removes the lab at the end (also on errors and Ctrl-C) unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

VENV_BIN = Path(sys.executable).parent
BENCH_DIR = Path("/var/tmp/deepfleet-bench")
ANSIBLE_VENV = BENCH_DIR / "venv-ansible"
ANSIBLE_DEFAULT_FORKS = 5
LB_NAME = "lb-01"
FIRST_HOST_OFFSET = 10  # lb-01 is .10, gpu-01 .11, ... as in hosts/lab.yaml
COMMAND_TIMEOUT_S = 1800

# Phases, in table order: (key, label, deepfleet's phase, Ansible's phase)
PHASES: tuple[tuple[str, str, str, str], ...] = (
    ("first", "first deploy", "deepfleet deploy (first)", "ansible apply (first)"),
    ("noop", "no-op re-deploy", "deepfleet deploy (no-op)", "ansible apply (no-op)"),
    ("drift", "drift check", "deepfleet drift", "ansible --check --diff"),
)


# --- the N-node spec ---------------------------------------------------------------------------


def node_names(count: int) -> list[str]:
    """lb-01 first, then gpu-01.. (the order `lab up --nodes` would keep)."""
    if count < 1:
        raise ValueError("a fleet needs at least 1 node")
    return [LB_NAME] + [f"gpu-{i:02d}" for i in range(1, count)]


def engine_nodes(names: Sequence[str]) -> list[str]:
    """Every node but the load balancer serves a replica; a one-node fleet serves on lb-01."""
    return list(names[1:]) or [names[0]]


def node_address(network: IPv4Network, index: int) -> IPv4Address:
    address = network.network_address + FIRST_HOST_OFFSET + index
    if address not in network or address == network.broadcast_address:
        raise ValueError(f"node {index + 1} does not fit in {network}")
    return address


def fleet_spec_data(base: Mapping[str, Any], count: int) -> dict[str, Any]:
    """A lab spec for `count` nodes from a lab spec's data (`ClusterSpec.model_dump(mode="json")`).

    Keeps the base's site, lab, network, storage, model and the first deployment's settings;
    replaces the nodes, makes lb-01 the time server and gives every GPU node one chat replica.
    The roles of infra-01 (NAT, monitoring) are left out: the benchmark times GPU and LB nodes.
    """
    lab = base.get("lab")
    if not lab:
        raise ValueError("the base spec has no `lab:` section")
    network_name = lab["network"]
    network = next(n for n in base["networks"] if n["name"] == network_name)
    cidr = IPv4Network(network["cidr"])
    names = node_names(count)
    engines = engine_nodes(names)
    addresses = {name: str(node_address(cidr, i)) for i, name in enumerate(names)}
    if lab["host_address"] in addresses.values():
        raise ValueError(f"the lab host address {lab['host_address']} collides with a node")
    iface = "host0"  # the lab node's one veth (infra.lab.plan.NODE_IFACE)
    nodes = [
        {
            "name": name,
            "groups": (["lb"] if name == LB_NAME else []) + (["gpu"] if name in engines else []),
            "address": addresses[name],
            "nics": [{"name": iface, "match": iface}],
            "addresses": [
                {"interface": iface, "network": network_name, "address": addresses[name]}
            ],
        }
        for name in names
    ]
    data = {k: v for k, v in base.items() if k not in ("nat", "monitoring")}
    data["name"] = f"bench-fleet-{count}"
    data["nodes"] = nodes
    site = dict(base["site"])
    site["ntp"] = {
        **base["site"].get("ntp", {}),
        "servers": [addresses[LB_NAME]],
        "pools": [],
        "serve_from": [LB_NAME],
    }
    data["site"] = site
    if base.get("deployments"):
        first = dict(base["deployments"][0])
        first["replicas"] = [[name] for name in engines]
        data["deployments"] = [first]
    if base.get("load_balancer"):
        data["load_balancer"] = {**base["load_balancer"], "nodes": [LB_NAME]}
    return data


def write_fleet_spec(base_path: Path, count: int, directory: Path) -> Path:
    """Validate the generated spec with the project's own model and write it as YAML."""
    import yaml

    from infra.spec import ClusterSpec, load_spec

    base = load_spec(base_path).model_dump(mode="json", exclude_defaults=True)
    data = fleet_spec_data(base, count)
    ClusterSpec.model_validate(data)  # raises with the rule that failed
    path = directory / f"bench-fleet-{count}.yaml"
    header = f"# Generated by bench/fleet.py from {base_path.name} for {count} nodes.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- statistics and the table ------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    def cell(self) -> str:
        if self.runs == 1:
            return f"{self.median:.1f} s (1 run)"
        return f"{self.median:.1f} s [{self.low:.1f}–{self.high:.1f}] ×{self.runs}"


def ratio(ours: Summary | None, theirs: Summary | None) -> str:
    """Our median over Ansible's, and how many times faster that is."""
    if ours is None or theirs is None or theirs.median <= 0 or ours.median <= 0:
        return "–"
    value = ours.median / theirs.median
    return (
        f"{value:.2f} ({theirs.median / ours.median:.1f}× faster)" if value < 1 else f"{value:.2f}"
    )


@dataclass
class Run:
    phase: str
    nodes: int
    seconds: float
    returncode: int
    maxrss_mib: float
    cpu_seconds: float
    forks: int | None = None
    changed: int | None = None  # Ansible: sum of changed= in the recap
    note: str = ""
    tree_pss_mib: float = 0.0  # peak PSS of the command's whole process tree


def summarise(
    runs: Iterable[Run], nodes: int, phase: str, forks: int | None = None
) -> Summary | None:
    return Summary.of(
        [
            r.seconds
            for r in runs
            if r.nodes == nodes and r.phase == phase and r.forks == forks and r.returncode == 0
        ]
    )


def peak_mib(runs: Iterable[Run], nodes: int, phase: str, tree: bool = False) -> float | None:
    """Largest peak over the runs: of the biggest process (ru_maxrss) or of the process tree."""
    values = [
        r.tree_pss_mib if tree else r.maxrss_mib
        for r in runs
        if r.nodes == nodes and r.phase == phase
    ]
    return max(values) if values else None


def memory_cell(runs: Sequence[Run], nodes: int, ours: str, theirs: str) -> str:
    peaks = [
        peak_mib(runs, nodes, phase, tree) for tree in (False, True) for phase in (ours, theirs)
    ]
    if any(p is None for p in peaks):
        return "–"
    rss_ours, rss_theirs, pss_ours, pss_theirs = peaks
    return f"{rss_ours:.0f} / {rss_theirs:.0f}; tree {pss_ours:.0f} / {pss_theirs:.0f}"


def format_table(runs: Sequence[Run], sizes: Sequence[int]) -> str:
    """Markdown table: one row per size and phase; ratio = our median / Ansible's median."""
    head = (
        "| nodes | phase | deepfleet (pyinfra) | Ansible forks=5 | Ansible forks=N "
        "| ours / Ansible (forks=N) | ours / Ansible (forks=5) "
        "| controller MiB ours / Ansible: max RSS; tree PSS |"
    )
    lines = [head, "|" + "---|" * 8]
    for size in sizes:
        for _, label, ours_phase, their_phase in PHASES:
            ours = summarise(runs, size, ours_phase)
            five = summarise(runs, size, their_phase, min(ANSIBLE_DEFAULT_FORKS, size))
            wide = summarise(runs, size, their_phase, size)
            rss = memory_cell(runs, size, ours_phase, their_phase)
            lines.append(
                f"| {size} | {label} | {ours.cell() if ours else '–'} "
                f"| {five.cell() if five else '–'} | {wide.cell() if wide else '–'} "
                f"| {ratio(ours, wide)} | {ratio(ours, five)} | {rss} |"
            )
    return "\n".join(lines)


RECAP = re.compile(r"^\S+\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def ansible_recap(output: str) -> tuple[int, int, int]:
    """(changed, unreachable, failed) summed over the hosts of an ansible-playbook recap."""
    changed = unreachable = failed = 0
    for match in RECAP.finditer(output):
        changed += int(match.group(2))
        unreachable += int(match.group(3))
        failed += int(match.group(4))
    return changed, unreachable, failed


# --- running and measuring ---------------------------------------------------------------------


@dataclass
class Finished:
    seconds: float
    returncode: int
    maxrss_mib: float
    cpu_seconds: float
    output: str
    tree_pss_mib: float = 0.0


def parent_pids(stat_lines: Mapping[int, str]) -> dict[int, int]:
    """pid -> parent pid from /proc/PID/stat contents (the command name may hold spaces)."""
    parents = {}
    for pid, line in stat_lines.items():
        fields = line[line.rfind(")") + 2 :].split()
        if len(fields) > 1:
            parents[pid] = int(fields[1])
    return parents


def descendants(root: int, parents: Mapping[int, int]) -> set[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def tree_pss_kib(root: int) -> int:
    """Proportional set size of a process and all its descendants (shared pages split)."""
    stats: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = (entry / "stat").read_text()
            except OSError:
                continue
    total = 0
    for pid in descendants(root, parent_pids(stats)):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


def measure(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Finished:
    """Run a command: wall time, wait4's rusage of it (CPU, and ru_maxrss: the peak RSS of its
    largest process, as RUSAGE_CHILDREN reports it) and the peak PSS of its whole process tree
    (sampled every half second: Ansible's forks are separate processes)."""
    with tempfile.TemporaryFile("w+") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            list(argv),
            cwd=PROJECT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = started + COMMAND_TIMEOUT_S
        peak_pss = 0
        next_sample = started
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            now = time.monotonic()
            if now > deadline:
                process.kill()
            if now >= next_sample:
                peak_pss = max(peak_pss, tree_pss_kib(process.pid))
                next_sample = now + 0.5
            time.sleep(0.02)
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return Finished(
            seconds=seconds,
            returncode=process.returncode,
            maxrss_mib=usage.ru_maxrss / 1024,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            output=out.read(),
            tree_pss_mib=peak_pss / 1024,
        )


def tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


class Bench:
    def __init__(
        self,
        spec_path: Path,
        nodes: int,
        log: Callable[[str], None],
        runs: list[Run],
        save: Callable[[], None],
    ) -> None:
        self.spec_path = spec_path
        self.nodes = nodes
        self.log = log
        self.runs = runs  # shared by every size; saved after each run
        self.save = save
        self.env = {"DEEPFLEET_SPEC": str(spec_path), "PYINFRA_PROGRESS": "off"}

    def record(
        self, phase: str, result: Finished, forks: int | None = None, changed: int | None = None
    ) -> Run:
        note = "" if result.returncode == 0 else tail(result.output)
        run = Run(
            phase=phase,
            nodes=self.nodes,
            seconds=round(result.seconds, 3),
            returncode=result.returncode,
            maxrss_mib=round(result.maxrss_mib, 1),
            cpu_seconds=round(result.cpu_seconds, 2),
            forks=forks,
            changed=changed,
            note=note,
            tree_pss_mib=round(result.tree_pss_mib, 1),
        )
        self.runs.append(run)
        self.save()
        extra = f" forks={forks}" if forks else ""
        extra += f" changed={changed}" if changed is not None else ""
        status = "ok" if result.returncode == 0 else f"exit {result.returncode}: {note}"
        self.log(
            f"  {self.nodes:>2} nodes  {phase:<26}{extra:<20} {result.seconds:7.1f} s  "
            f"cpu {result.cpu_seconds:6.1f} s  rss {result.maxrss_mib:5.0f} MiB  "
            f"tree pss {result.tree_pss_mib:5.0f} MiB  {status}"
        )
        return run

    # lab
    def lab(self, *args: str) -> None:
        result = measure([str(VENV_BIN / "deepfleet"), "lab", *args])
        if result.returncode != 0:
            raise RuntimeError(f"deepfleet lab {' '.join(args)} failed: {tail(result.output, 20)}")

    def reset(self) -> None:
        """Fresh nodes: throw every overlay away and boot them again."""
        self.lab("down", "--spec", str(self.spec_path))
        self.lab("up", "--spec", str(self.spec_path))

    # deepfleet
    def pyinfra(self, phase: str) -> Run:
        argv = [str(VENV_BIN / "pyinfra"), "-y", "inventory.py", "deploy.py"]
        return self.record(phase, measure(argv, self.env))

    def drift(self) -> Run:
        argv = [str(VENV_BIN / "deepfleet"), "drift", str(self.spec_path)]
        result = measure(argv, self.env)
        run = self.record("deepfleet drift", result)
        if result.returncode == 3:
            run.note = "drift found: " + tail(result.output, 12)
        return run

    def profile(self, out: Path) -> None:
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--profile-pyinfra",
            str(out),
            "--",
            "-y",
            "inventory.py",
            "deploy.py",
        ]
        result = measure(argv, self.env)
        self.log(f"  profiled no-op run: {result.seconds:.1f} s (exit {result.returncode})")

    # Ansible
    def ansible(self, phase: str, inventory: Path, forks: int, check: bool = False) -> Run:
        argv = [str(ANSIBLE_VENV / "bin/ansible-playbook"), "-i", str(inventory)]
        argv += ["--forks", str(forks), str(PLAYBOOK)]
        if check:
            argv += ["--check", "--diff"]
        result = measure(argv, ansible_env(inventory.parent))
        changed, unreachable, failed = ansible_recap(result.output)
        if result.returncode == 0 and (unreachable or failed):
            result.returncode = 1
        return self.record(phase, result, forks=forks, changed=changed)


def ansible_env(workdir: Path) -> dict[str, str]:
    """Ansible tuned the way its docs advise for speed: pipelining, no fact gathering (in the
    playbook), a fixed interpreter (no discovery round trip). SSH control sockets in a fresh
    directory per run, so no run reuses an earlier run's connections."""
    control = Path(tempfile.mkdtemp(prefix="cp-", dir=workdir))
    return {
        "ANSIBLE_HOME": str(BENCH_DIR / "ansible-home"),
        "ANSIBLE_LOCAL_TEMP": str(workdir / "tmp"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
        "ANSIBLE_SSH_ARGS": (
            "-C -o ControlMaster=auto -o ControlPersist=60s "
            "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o LogLevel=ERROR"
        ),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
    }


PLAYBOOK = PROJECT / "bench/ansible/site.yml"


def ensure_ansible(log: Callable[[str], None]) -> str:
    playbook_bin = ANSIBLE_VENV / "bin/ansible-playbook"
    if not playbook_bin.exists():
        log(f"ansible: creating {ANSIBLE_VENV} (ansible-core from PyPI)")
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(ANSIBLE_VENV)], check=True)
        subprocess.run([str(ANSIBLE_VENV / "bin/pip"), "install", "-q", "ansible-core"], check=True)
    version = subprocess.run(
        [str(ANSIBLE_VENV / "bin/ansible"), "--version"], capture_output=True, text=True, check=True
    )
    return version.stdout.splitlines()[0]


# --- the profile of one no-op run --------------------------------------------------------------


def profile_pyinfra(out: Path, pyinfra_args: list[str]) -> int:
    """Run the pyinfra CLI in this process with timers around facts, operations and commands."""
    from time import perf_counter

    import pyinfra.api.facts as facts_module
    import pyinfra.api.operations as operations_module
    from pyinfra.connectors.ssh import SSHConnector

    started = perf_counter()
    events: list[dict[str, Any]] = []

    def note(kind: str, host: Any, name: str, begin: float, **extra: Any) -> None:
        events.append(
            {
                "kind": kind,
                "host": getattr(host, "name", str(host)),
                "name": name,
                "start": round(begin - started, 4),
                "seconds": round(perf_counter() - begin, 4),
                **extra,
            }
        )

    real_get_fact = facts_module._get_fact

    def timed_get_fact(state: Any, host: Any, cls: Any, *args: Any, **kwargs: Any) -> Any:
        begin = perf_counter()
        try:
            return real_get_fact(state, host, cls, *args, **kwargs)
        finally:
            # get_fact passes (args, kwargs) positionally: the fact's own arguments.
            positional = args[0] if args else None
            named = dict(args[1] if len(args) > 1 and args[1] else kwargs.get("kwargs") or {})
            key = repr((list(positional or []), sorted(named.items())))[:160]
            note("fact", host, cls.__name__, begin, args=key)

    real_run_host_op = operations_module.run_host_op

    def timed_run_host_op(state: Any, host: Any, op_hash: str) -> Any:
        begin = perf_counter()
        try:
            return real_run_host_op(state, host, op_hash)
        finally:
            names = sorted(state.get_op_meta(op_hash).names)
            note("op", host, names[0] if names else op_hash, begin)

    real_command = SSHConnector.run_shell_command

    def timed_command(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        begin = perf_counter()
        try:
            return real_command(self, command, *args, **kwargs)
        finally:
            note("command", self.host, str(command)[:120], begin)

    real_connect = SSHConnector.connect

    def timed_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        begin = perf_counter()
        try:
            return real_connect(self, *args, **kwargs)
        finally:
            note("connect", self.host, "ssh connect", begin)

    facts_module._get_fact = timed_get_fact
    operations_module.run_host_op = timed_run_host_op
    SSHConnector.run_shell_command = timed_command  # type: ignore[method-assign]
    SSHConnector.connect = timed_connect  # type: ignore[method-assign]

    from pyinfra_cli.main import main as pyinfra_main

    code = 0
    sys.argv = ["pyinfra", *pyinfra_args]
    try:
        pyinfra_main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        total = perf_counter() - started
        out.write_text(json.dumps({"seconds": total, "events": events}), encoding="utf-8")
    return code


@dataclass
class ProfileReport:
    seconds: float
    hosts: int
    prepare_seconds: float  # until the first operation ran (facts while building the plan)
    per_host: dict[str, dict[str, float]] = field(default_factory=dict)
    facts: list[tuple[str, int, float]] = field(default_factory=list)  # name, calls, seconds
    repeated: list[tuple[str, float]] = field(default_factory=list)  # name(args), extra calls/host
    ops: list[tuple[str, int, float]] = field(default_factory=list)  # name, hosts, seconds
    commands_per_host: float = 0.0


def analyse_profile(data: Mapping[str, Any], top: int = 12) -> ProfileReport:
    """Pure: where a profiled pyinfra run spent its time (seconds summed over hosts)."""
    events: list[dict[str, Any]] = list(data.get("events", []))
    hosts = sorted({e["host"] for e in events if e["kind"] != "connect" or e["host"]})
    ops = [e for e in events if e["kind"] == "op"]
    first_op = min((e["start"] for e in ops), default=float(data.get("seconds", 0.0)))
    report = ProfileReport(
        seconds=float(data.get("seconds", 0.0)), hosts=len(hosts), prepare_seconds=first_op
    )
    per_host: dict[str, Counter[str]] = defaultdict(Counter)
    fact_calls: Counter[str] = Counter()
    fact_time: Counter[str] = Counter()
    op_hosts: Counter[str] = Counter()
    op_time: Counter[str] = Counter()
    same: Counter[tuple[str, str, str]] = Counter()
    for event in events:
        host = event["host"]
        kind = event["kind"]
        per_host[host][f"{kind}s"] += 1
        per_host[host][f"{kind}_seconds"] += event["seconds"]
        if kind == "fact":
            fact_calls[event["name"]] += 1
            fact_time[event["name"]] += event["seconds"]
            same[(host, event["name"], event.get("args", ""))] += 1
        elif kind == "op":
            op_hosts[event["name"]] += 1
            op_time[event["name"]] += event["seconds"]
    report.per_host = {h: dict(c) for h, c in sorted(per_host.items())}
    report.facts = [(n, fact_calls[n], round(t, 3)) for n, t in fact_time.most_common(top)]
    extra: Counter[str] = Counter()
    for (_, name, args), calls in same.items():
        if calls > 1:
            extra[f"{name}{args}"] += calls - 1
    count = max(len(hosts), 1)
    report.repeated = [(n, round(c / count, 1)) for n, c in extra.most_common(top)]
    report.ops = [(n, op_hosts[n], round(t, 3)) for n, t in op_time.most_common(top)]
    commands = sum(c.get("commands", 0) for c in per_host.values())
    report.commands_per_host = round(commands / count, 1)
    return report


def format_profile(report: ProfileReport, nodes: int) -> str:
    lines = [
        f"profile of one no-op deploy on {nodes} nodes: {report.seconds:.1f} s, of which "
        f"{report.prepare_seconds:.1f} s before the first operation ran (connect + facts + plan); "
        f"{report.commands_per_host} remote commands per host",
        "",
        "| fact | calls | seconds (sum over hosts) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {calls} | {seconds:.2f} |" for name, calls, seconds in report.facts]
    if report.repeated:
        lines += ["", "| fact asked again with the same arguments | extra calls per host |"]
        lines += ["|---|---|"] + [f"| `{n}` | {c} |" for n, c in report.repeated]
    lines += ["", "| operation (execute phase) | hosts | seconds (sum) |", "|---|---|---|"]
    lines += [f"| {name} | {hosts} | {seconds:.2f} |" for name, hosts, seconds in report.ops]
    return "\n".join(lines)


# --- the benchmark -----------------------------------------------------------------------------


def machine() -> str:
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {memory} memory, kernel {os.uname().release}"


@dataclass(frozen=True)
class Plan:
    """How many runs of what; the defaults time everything `--runs` times."""

    runs: int = 3
    first_runs: int = 3
    # Ansible with its default forks=5 (only meaningful above 5 nodes: below, 5 forks are N).
    default_forks_runs: int = 3
    ansible: bool = True
    ansible_first: bool = True


def ansible_forks(nodes: int) -> list[int]:
    """forks=N (every host at once, as pyinfra does) first, then Ansible's default if it differs."""
    return [nodes] + ([ANSIBLE_DEFAULT_FORKS] if nodes > ANSIBLE_DEFAULT_FORKS else [])


def bench_size(
    base_spec: Path,
    nodes: int,
    plan: Plan,
    work: Path,
    log: Callable[[str], None],
    runs: list[Run],
    save: Callable[[], None],
) -> ProfileReport | None:
    from bench.ansible.baseline import write_inputs
    from infra.lab import LabPaths
    from infra.spec import load_spec

    spec_path = write_fleet_spec(base_spec, nodes, work)
    bench = Bench(spec_path, nodes, log, runs, save)
    log(f"{nodes} nodes: spec {spec_path}")
    inventory = write_inputs(
        load_spec(spec_path), work / f"ansible-{nodes}", PROJECT / LabPaths().ssh_key
    )

    for _ in range(plan.first_runs):
        bench.reset()
        bench.pyinfra("deepfleet deploy (first)")
    for _ in range(plan.runs):
        bench.pyinfra("deepfleet deploy (no-op)")
    for _ in range(plan.runs):
        bench.drift()
    profile_file = work / f"profile-{nodes}.json"
    bench.profile(profile_file)
    report = (
        analyse_profile(json.loads(profile_file.read_text())) if profile_file.exists() else None
    )
    if not plan.ansible:
        return report

    # python3-apt for Ansible's apt module; every file must already be identical.
    converge = bench.ansible("ansible converge (untimed)", inventory, nodes)
    converge.note = (converge.note + " (python3-apt installed; files must be unchanged)").strip()
    for forks in ansible_forks(nodes):
        count = plan.runs if forks == nodes else plan.default_forks_runs
        for _ in range(count):
            bench.ansible("ansible --check --diff", inventory, forks, check=True)
        for _ in range(count):
            bench.ansible("ansible apply (no-op)", inventory, forks)
    if plan.ansible_first:
        for forks in ansible_forks(nodes):
            for _ in range(plan.first_runs):
                bench.reset()
                bench.ansible("ansible apply (first)", inventory, forks)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nodes",
        default="4,8,16",
        help="fleet sizes (1: one node is both load balancer and engine)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each no-op and check phase")
    parser.add_argument(
        "--first-runs", type=int, default=None, help="first deploys per tool (default: --runs)"
    )
    parser.add_argument("--spec", default=str(PROJECT / "hosts/lab.yaml"), help="base lab spec")
    parser.add_argument("--json", type=Path, help="write every run and the profiles here")
    parser.add_argument(
        "--default-forks-runs",
        type=int,
        default=None,
        help="Ansible runs with forks=5 per phase (default: --runs); forks=N runs --runs times",
    )
    parser.add_argument("--skip-ansible", action="store_true")
    parser.add_argument(
        "--skip-ansible-first", action="store_true", help="no Ansible apply on fresh nodes"
    )
    parser.add_argument("--keep", action="store_true", help="leave the last lab running")
    parser.add_argument(
        "--table-from",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print the table and profiles of earlier --json files (no lab needed)",
    )
    parser.add_argument("--profile-pyinfra", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_pyinfra:
        return profile_pyinfra(args.profile_pyinfra, args.rest)
    if args.table_from:
        print(table_from(args.table_from))
        return 0

    os.chdir(PROJECT)
    sizes = [int(s) for s in args.nodes.split(",") if s]
    first_runs = args.runs if args.first_runs is None else args.first_runs
    plan = Plan(
        runs=args.runs,
        first_runs=first_runs,
        default_forks_runs=args.runs
        if args.default_forks_runs is None
        else args.default_forks_runs,
        ansible=not args.skip_ansible,
        ansible_first=not args.skip_ansible_first,
    )
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}] {text}", flush=True)

    log(f"machine: {machine()}")
    if not args.skip_ansible:
        log(f"ansible: {ensure_ansible(log)}")
    work = Path(tempfile.mkdtemp(prefix="fleet-", dir=_bench_dir()))
    all_runs: list[Run] = []
    profiles: dict[int, ProfileReport] = {}
    base = Path(args.spec)
    last_spec: Path | None = None

    def save() -> None:
        if args.json:
            _save(args.json, all_runs, profiles, sizes)

    try:
        for size in sizes:
            last_spec = work / f"bench-fleet-{size}.yaml"
            profile = bench_size(base, size, plan, work, log, all_runs, save)
            if profile is not None:
                profiles[size] = profile
            save()
    finally:
        if not args.keep:
            down = [str(VENV_BIN / "deepfleet"), "lab", "down"]
            if last_spec is not None:
                down += ["--spec", str(last_spec)]
            subprocess.run(down, cwd=PROJECT, check=False)
    print()
    print(f"machine: {machine()}; first deploys per tool and size: {first_runs}")
    print(format_table(all_runs, sizes))
    for size, profile in profiles.items():
        print()
        print(format_profile(profile, size))
    failed = [r for r in all_runs if r.returncode != 0]
    for run in failed:
        print(f"FAILED: {run.nodes} nodes {run.phase} (forks {run.forks}): {run.note}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def table_from(documents: Sequence[Path]) -> str:
    """The table (and profiles) of several `--json` files, e.g. one run per fleet size."""
    runs: list[Run] = []
    machines: set[str] = set()
    profiles: list[str] = []
    for path in documents:
        document = json.loads(path.read_text(encoding="utf-8"))
        machines.add(document["machine"])
        runs += [Run(**r) for r in document["runs"]]
        for size, profile in document.get("profiles", {}).items():
            profiles.append(format_profile(ProfileReport(**profile), int(size)))
    sizes = sorted({r.nodes for r in runs})
    return "\n\n".join(
        [f"machine: {'; '.join(sorted(machines))}", format_table(runs, sizes), *profiles]
    )


def _bench_dir() -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    return BENCH_DIR


def _save(
    path: Path, runs: Sequence[Run], profiles: Mapping[int, ProfileReport], sizes: Sequence[int]
) -> None:
    document = {
        "machine": machine(),
        "runs": [asdict(r) for r in runs],
        "profiles": {str(k): asdict(v) for k, v in profiles.items()},
        "table": format_table(runs, sizes),
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
