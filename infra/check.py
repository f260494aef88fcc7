"""`deepfleet check`: is each node, and the serving path, fit to take traffic?

Three layers, so that the decisions are tested on a CPU with captured outputs
(tests/fixtures/check/) and the deploy can reuse them:

1. `NodeExpectations` (`expectations(spec, node)`): what the spec promises for one node.
2. `probe_script(expectations)`: one POSIX shell script, run on the node over SSH (or by the
   pyinfra fact `facts.node_health.NodeHealth`), that prints every raw output in sections;
   `parse_sections` splits them again. Parsers (`parse_gpu_query`, `parse_ibstat`,
   `parse_chrony_tracking`, ...) and `evaluate_node(...)` are pure: outputs in, `Verdict` out.
   GPU burn-in, ECC, XID and InfiniBand judgements are `infra.acceptance.verdict.evaluate`'s.
3. I/O (`check_cluster`): SSH with the same connection data as pyinfra, the burn-in in the
   engine container, and the serving checks against the load balancer.

The sglang role gates a node on `node_ready(spec, node, sections)` before it joins the load
balancer. Exit codes of the command: 0 all pass, 1 a check failed, 2 bad input or unreachable.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import shlex
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facts.nvidia import QUERY_FIELDS, parse_nvidia_smi
from infra.acceptance.thresholds import gpu_model_from_name, model_key
from infra.acceptance.verdict import (
    Check,
    ExpectedPort,
    IbPort,
    NodeFacts,
    Status,
    Verdict,
    evaluate,
    evaluate_multi_node_allreduce,
)
from infra.errors import Problem, UserError
from infra.sglang import nccl_env_files, nccl_env_probe
from infra.spec import ClusterSpec, Node, SecretRef

# --- limits (docs/monitoring.md lists them) -------------------------------------------------------

MAX_CLOCK_OFFSET_S = 0.05
"""Same limit as the ClockOffsetHigh alert."""
MAX_TTFT_P95_S = 10.0
"""Same limit as the SglangTtftP95High alert."""
MANIFEST = "SHA256SUMS"
BURNIN_REMOTE_DIR = "/opt/deepfleet"
BURNIN_NCCL_ENV = f"{BURNIN_REMOTE_DIR}/nccl.env"
BURNIN_SCRIPT = Path(__file__).resolve().parent / "acceptance" / "burnin.py"
SECTION_MARKER = "@@deepfleet-section"
SSH_UNREACHABLE = 255
PROJECT_DIR = Path(__file__).resolve().parent.parent

GPU_QUERY_FIELDS = QUERY_FIELDS


# --- what the spec promises -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDir:
    name: str
    path: str


@dataclass(frozen=True)
class Engine:
    deployment: str
    replica: int
    port: int


@dataclass(frozen=True)
class NodeExpectations:
    node: str
    lab: bool
    gpu_model: str | None
    gpu_count: int
    driver_branch: int
    driver_version: str | None
    """Upstream version to match exactly (570.172.08), or None: any of `driver_branch`."""
    hgx: bool
    rdma: tuple[ExpectedPort, ...]
    time_sync: str
    dns_names: tuple[str, ...]
    models: tuple[ModelDir, ...]
    engines: tuple[Engine, ...]
    image: str | None
    """The engine image the burn-in runs in (the node's first deployment's)."""
    verify_checksums: bool = True
    gid_probe: tuple[str, ...] = ()
    """RoCE nodes: the GID probe with `--out -` (prints the index the table gives now)."""
    gid_env_files: tuple[str, ...] = ()
    """Where each engine's probe wrote the index it started with (removed when it stops)."""


def expectations(
    spec: ClusterSpec,
    node: Node,
    *,
    dns_names: Sequence[str] | None = None,
    verify_checksums: bool = True,
) -> NodeExpectations:
    deployments = [d for d in spec.deployments if any(node.name in r for r in d.replicas)]
    models: list[ModelDir] = []
    for deployment in deployments:
        model = spec.model(deployment.model)
        storage = spec.storage_named(model.storage)
        root = storage.local_cache or storage.mount_point
        entry = ModelDir(model.name, f"{root.rstrip('/')}/{model.path}")
        if entry not in models:
            models.append(entry)
    engines = tuple(
        Engine(d.name, number, d.port)
        for d in deployments
        for number, replica in enumerate(d.replicas, start=1)
        if replica[0] == node.name
    )
    driver = spec.nvidia.driver_version
    gid_env_files = nccl_env_files(spec, node)
    return NodeExpectations(
        node=node.name,
        lab=spec.is_lab,
        gpu_model=node.gpus.model if node.gpus else None,
        gpu_count=node.gpus.count if node.gpus else 0,
        driver_branch=spec.nvidia.driver_branch,
        driver_version=driver.split("-")[0] if driver else None,
        hgx=bool(node.gpus and node.gpus.nvswitch),
        rdma=tuple(ExpectedPort(r.device, r.port, r.rate_gbps) for r in node.rdma),
        time_sync=spec.site.ntp.implementation,
        dns_names=tuple(dns_names) if dns_names else tuple(n.name for n in spec.nodes),
        models=tuple(models),
        engines=engines,
        image=deployments[0].image if deployments else None,
        verify_checksums=verify_checksums,
        gid_probe=tuple(nccl_env_probe(node, "-")) if gid_env_files else (),
        gid_env_files=tuple(gid_env_files),
    )


# --- the probe -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    name: str
    rc: int
    output: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]


Sections = Mapping[str, Section]
NOT_INSTALLED = 127


def _model_probe(model: ModelDir, verify: bool) -> str:
    d = shlex.quote(model.path)
    checksum = (
        f"out=$(cd {d} && sha256sum -c --quiet {MANIFEST} 2>&1); rc=$?; "
        'printf "%s\\n" "$out" | tail -n 50; echo "sha256sum-rc $rc";'
        if verify
        else "echo checksum-skipped;"
    )
    return (
        f"if [ ! -d {d} ]; then echo missing-dir; exit 3; fi; "
        f"[ -f {d}/config.json ] && echo config-json; "
        f'echo "files $(ls -1 {d} | wc -l)"; '
        f"if [ -f {d}/{MANIFEST} ]; then echo manifest; {checksum} fi; exit 0"
    )


def probe_commands(exp: NodeExpectations) -> list[tuple[str, str]]:
    """(section, shell command) pairs the probe runs; each command's output is one section."""
    smi = "command -v nvidia-smi >/dev/null || { echo 'nvidia-smi not installed'; exit 127; }; "
    commands: list[tuple[str, str]] = []
    if exp.gpu_count or not exp.lab:
        commands.append(
            (
                "gpus",
                smi
                + "nvidia-smi --query-gpu="
                + ",".join(GPU_QUERY_FIELDS)
                + " --format=csv,noheader,nounits",
            )
        )
    if exp.hgx:
        commands.append(("fabricmanager", "systemctl is-active nvidia-fabricmanager"))
        commands.append(("nvlink", smi + "nvidia-smi nvlink -s"))
    commands.append(
        (
            "xid",
            "if log=$(journalctl -k -b --no-pager -q -o cat 2>/dev/null) || log=$(dmesg 2>/dev/null); "
            "then printf '%s\\n' \"$log\" | grep -F 'NVRM: Xid' | tail -n 200; exit 0; "
            "else echo 'kernel log unreadable'; exit 3; fi",
        )
    )
    if exp.rdma:
        commands.append(
            (
                "ibstat",
                "command -v ibstat >/dev/null || { echo 'ibstat not installed'; exit 127; }; ibstat",
            )
        )
    if exp.gid_probe:
        # The index the GID table gives now, then the one each engine started with.
        files = " ".join(shlex.quote(f) for f in exp.gid_env_files)
        commands.append(
            (
                "roce-gid",
                f"now=$({shlex.join(exp.gid_probe)}) || exit $?; "
                "printf '%s\\n' \"$now\" | sed -n 's/^NCCL_IB_GID_INDEX=/now /p'; "
                f"for f in {files}; do "
                'printf \'engine %s %s\\n\' "$f" "$(sed -n \'s/^NCCL_IB_GID_INDEX=//p\' "$f" 2>/dev/null)"; '
                "done",
            )
        )
    if exp.time_sync == "chrony":
        commands.append(("clock", "chronyc -n tracking"))
    else:
        commands.append(("clock", "timedatectl timesync-status"))
    names = " ".join(shlex.quote(n) for n in exp.dns_names)
    commands.append(
        (
            "dns",
            f'for n in {names}; do if a=$(getent hosts "$n"); then '
            "echo \"ok $n $(printf '%s' \"$a\" | head -n1 | cut -d' ' -f1)\"; "
            'else echo "fail $n"; fi; done',
        )
    )
    for model in exp.models:
        commands.append((f"model:{model.name}", _model_probe(model, exp.verify_checksums)))
    for engine in exp.engines:
        url = f"http://127.0.0.1:{engine.port}/health_generate"
        commands.append(
            (
                f"engine:{engine.deployment}:{engine.replica}",
                "python3 -c "
                + shlex.quote(
                    "import sys, urllib.request as u\n"
                    f'try: print(u.urlopen("{url}", timeout=60).status)\n'
                    'except Exception as e: print(getattr(e, "code", "") or e); sys.exit(1)'
                ),
            )
        )
    return commands


def probe_script(exp: NodeExpectations) -> str:
    """One POSIX shell script printing every probe as `@@deepfleet-section NAME RC` + output."""
    lines = [
        "#!/bin/sh",
        "# deepfleet check: read-only probes of this node's health; changes nothing.",
        "LC_ALL=C; export LC_ALL",
        "section() {",
        "  name=$1; shift",
        '  out=$(sh -c "$1" 2>&1); rc=$?',
        f'  printf \'{SECTION_MARKER} %s %s\\n\' "$name" "$rc"',
        '  [ -n "$out" ] && printf \'%s\\n\' "$out"',
        "  return 0",
        "}",
    ]
    for name, command in probe_commands(exp):
        lines.append(f"section {shlex.quote(name)} {shlex.quote(command)}")
    lines.append("exit 0")
    return "\n".join(lines) + "\n"


def parse_sections(text: str | Iterable[str]) -> dict[str, Section]:
    raw = text.splitlines() if isinstance(text, str) else list(text)
    sections: dict[str, Section] = {}
    name: str | None = None
    rc = 0
    body: list[str] = []

    def close() -> None:
        if name is not None:
            sections[name] = Section(name, rc, "\n".join(body))

    for line in raw:
        if line.startswith(SECTION_MARKER + " "):
            close()
            parts = line.split()
            name, rc, body = parts[1], int(parts[2]) if len(parts) > 2 else 0, []
        elif name is not None:
            body.append(line)
    close()
    return sections


# --- parsers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmiGpu:
    index: int
    name: str
    driver_version: str
    persistence: bool
    memory_mib: int | None
    ecc_uncorrected: int | None


def parse_gpu_query(output: str) -> list[SmiGpu]:
    # The same query and parser as the nvidia_driver role's fact (facts/nvidia.py).
    state = parse_nvidia_smi(output.splitlines())
    return [
        SmiGpu(
            index=gpu["index"],
            name=gpu["name"],
            driver_version=gpu["driver_version"],
            persistence=gpu["persistence_mode"],
            memory_mib=gpu["memory_total_mib"],
            ecc_uncorrected=gpu["ecc_uncorrected"],
        )
        for gpu in state["gpus"]
    ]


def parse_nvlink(output: str) -> dict[int, tuple[int, int]]:
    """`nvidia-smi nvlink -s` -> {gpu index: (active links, inactive links)}."""
    links: dict[int, tuple[int, int]] = {}
    gpu: int | None = None
    for line in output.splitlines():
        head = re.match(r"\s*GPU (\d+):", line)
        if head:
            gpu = int(head.group(1))
            links[gpu] = (0, 0)
            continue
        link = re.match(r"\s*Link \d+:\s*(.*)$", line)
        if link and gpu is not None:
            active, inactive = links[gpu]
            if "inactive" in link.group(1).lower():
                links[gpu] = (active, inactive + 1)
            else:
                links[gpu] = (active + 1, inactive)
    return links


def parse_ibstat(output: str) -> list[IbPort]:
    ports: list[IbPort] = []
    device: str | None = None
    port: dict[str, Any] | None = None

    def close() -> None:
        if device is not None and port is not None:
            ports.append(
                IbPort(
                    device=device,
                    port=port["port"],
                    state=port.get("state", ""),
                    physical_state=port.get("physical"),
                    rate_gbps=port.get("rate"),
                )
            )

    for line in output.splitlines():
        ca = re.match(r"\s*CA '([^']+)'", line)
        if ca:
            close()
            device, port = ca.group(1), None
            continue
        head = re.match(r"\s*Port (\d+):\s*$", line)
        if head:
            close()
            port = {"port": int(head.group(1))}
            continue
        if port is None or ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        if key == "State":
            port["state"] = value
        elif key == "Physical state":
            port["physical"] = value
        elif key == "Rate":
            number = re.match(r"[\d.]+", value)
            port["rate"] = float(number.group(0)) if number else None
    close()
    return ports


@dataclass(frozen=True)
class ClockState:
    offset_s: float | None
    synchronised: bool
    source: str | None


def parse_chrony_tracking(output: str) -> ClockState:
    offset: float | None = None
    leap = ""
    source = None
    for line in output.splitlines():
        if ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        if key == "System time":
            number = re.match(r"([\d.]+) seconds (slow|fast)", value)
            if number:
                offset = float(number.group(1)) * (-1 if number.group(2) == "slow" else 1)
        elif key == "Leap status":
            leap = value
        elif key == "Reference ID":
            source = value
    return ClockState(offset, leap.lower() == "normal", source)


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0}


def parse_timesync_status(output: str) -> ClockState:
    """`timedatectl timesync-status` (systemd-timesyncd)."""
    offset = None
    leap = ""
    source = None
    for line in output.splitlines():
        if ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        if key == "Offset":
            number = re.match(r"([+-]?[\d.]+)\s*(ns|us|µs|ms|s|min)", value)
            if number:
                offset = float(number.group(1)) * _UNITS[number.group(2)]
        elif key == "Leap":
            leap = value
        elif key == "Server":
            source = value
    return ClockState(offset, leap.lower() == "normal", source)


def parse_dns(output: str) -> tuple[dict[str, str], list[str]]:
    resolved: dict[str, str] = {}
    failed: list[str] = []
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "ok":
            resolved[parts[1]] = parts[2] if len(parts) > 2 else ""
        elif len(parts) >= 2 and parts[0] == "fail":
            failed.append(parts[1])
    return resolved, failed


def parse_xids(output: str) -> list[int]:
    """XID codes from kernel log lines such as `NVRM: Xid (PCI:0000:18:00): 79, pid=...`."""
    return [int(m.group(1)) for m in re.finditer(r"NVRM: Xid \([^)]*\): (\d+)", output)]


# --- verdicts --------------------------------------------------------------------------------------


def _check(name: str, status: Status, measured: Any, expected: Any, message: str) -> Check:
    return Check(name, status, measured, expected, message)


def _na(name: str, message: str) -> Check:
    return _check(name, Status.NOT_APPLICABLE, None, None, message)


def _gpu_checks(exp: NodeExpectations, sections: Sections) -> tuple[list[Check], list[SmiGpu]]:
    if exp.gpu_count == 0:
        reason = "lab: no GPUs" if exp.lab else "no GPUs in the spec for this node"
        return [_na("gpu.checks", f"{reason}: GPU checks not applicable")], []
    section = sections.get("gpus")
    if section is None or section.rc != 0:
        error = section.output.strip() if section else "not probed"
        return [
            _check(
                "gpu.driver",
                Status.FAIL,
                error,
                exp.driver_version or f"{exp.driver_branch}.*",
                f"nvidia-smi failed: {error}; a driver/library mismatch after an upgrade needs "
                "a reboot, a missing driver the nvidia_driver role",
            )
        ], []
    gpus = parse_gpu_query(section.output)
    checks: list[Check] = []
    drivers = sorted({g.driver_version for g in gpus})
    want = exp.driver_version or f"{exp.driver_branch}.*"
    good = bool(drivers) and all(
        d == exp.driver_version if exp.driver_version else d.startswith(f"{exp.driver_branch}.")
        for d in drivers
    )
    checks.append(
        _check(
            "gpu.driver",
            Status.PASS if good else Status.FAIL,
            ",".join(drivers) or None,
            want,
            f"driver {', '.join(drivers) or 'unknown'}"
            + ("" if good else f", the spec wants {want}: run the nvidia_driver role, then reboot"),
        )
    )
    count_ok = len(gpus) == exp.gpu_count
    checks.append(
        _check(
            "gpu.visible",
            Status.PASS if count_ok else Status.FAIL,
            len(gpus),
            exp.gpu_count,
            f"{len(gpus)} of {exp.gpu_count} GPUs visible"
            + (
                ""
                if count_ok
                else "; a missing GPU: `nvidia-smi -L`, XID 79 in the kernel log, reseat or replace"
            ),
        )
    )
    if exp.gpu_model is not None:
        wrong = [
            f"GPU {g.index}: {g.name}"
            for g in gpus
            if model_key(
                gpu_model_from_name(g.name, g.memory_mib * 2**20 if g.memory_mib else None)
                or g.name
            )
            != model_key(exp.gpu_model)
        ]
        checks.append(
            _check(
                "gpu.model",
                Status.FAIL if wrong else Status.PASS,
                gpus[0].name if gpus else None,
                exp.gpu_model,
                f"not {exp.gpu_model}: {'; '.join(wrong)}" if wrong else f"all {exp.gpu_model}",
            )
        )
    off = [g.index for g in gpus if not g.persistence]
    checks.append(
        _check(
            "gpu.persistence",
            Status.FAIL if off else Status.PASS,
            len(gpus) - len(off),
            len(gpus),
            f"persistence mode off on GPU {', '.join(map(str, off))}: enable nvidia-persistenced"
            if off
            else "persistence mode on",
        )
    )
    return checks, gpus


def _hgx_checks(exp: NodeExpectations, sections: Sections) -> list[Check]:
    if not exp.hgx:
        return []
    fm = sections.get("fabricmanager")
    state = fm.output.strip() if fm else "not probed"
    checks = [
        _check(
            "gpu.fabricmanager",
            Status.PASS if fm is not None and fm.rc == 0 and state == "active" else Status.FAIL,
            state,
            "active",
            "nvidia-fabricmanager active"
            if state == "active"
            else f"nvidia-fabricmanager is {state}: on NVSwitch boards CUDA sees no GPU-to-GPU "
            "path without it; it must run exactly the driver's version (journalctl -u "
            "nvidia-fabricmanager)",
        )
    ]
    section = sections.get("nvlink")
    links = parse_nvlink(section.output) if section and section.rc == 0 else {}
    down = {gpu: n for gpu, (active, n) in links.items() if n or not active}
    if not links:
        checks.append(
            _check(
                "gpu.nvlink",
                Status.FAIL,
                None,
                "all links active",
                f"no NVLink state read: {section.output.strip() if section else 'not probed'}",
            )
        )
    else:
        checks.append(
            _check(
                "gpu.nvlink",
                Status.FAIL if down else Status.PASS,
                sum(a for a, _ in links.values()),
                "all links active",
                "inactive NVLink on GPU "
                + ", ".join(f"{gpu} ({n} links)" for gpu, n in sorted(down.items()))
                + ": reseat the board or check the NVSwitch tray"
                if down
                else f"NVLink active on {len(links)} GPUs",
            )
        )
    return checks


def _gid_checks(exp: NodeExpectations, sections: Sections) -> list[Check]:
    """RoCE: the GID table still has one good index, and every running engine started with it
    (an address added since then moves the index; the engine keeps the one it read)."""
    if not exp.gid_probe:
        return []
    section = sections.get("roce-gid")
    if section is None or section.rc != 0:
        why = section.output.strip() if section else "not probed"
        if section is not None and section.rc == NOT_INSTALLED:
            why = (
                f"{exp.gid_probe[0]} is not installed: the sglang role installs it with the "
                "engines' units (deploy first)"
            )
        return [_check("roce.gid_index", Status.FAIL, None, "one index", why)]
    now = next((line.split()[1] for line in section.lines if line.startswith("now ")), None)
    started = {
        parts[1]: parts[2] if len(parts) > 2 else None
        for parts in (line.split() for line in section.lines if line.startswith("engine "))
    }
    stale = {path: index for path, index in started.items() if index and index != now}
    if stale:
        return [
            _check(
                "roce.gid_index",
                Status.FAIL,
                sorted(set(stale.values())),
                now,
                "; ".join(
                    f"{path.rsplit('/', 1)[-1].removesuffix('.nccl.env')} started with "
                    f"NCCL_IB_GID_INDEX={index}"
                    for path, index in sorted(stale.items())
                )
                + f", the GID table has it at {now} now: restart those engines "
                "(systemctl restart <unit>, one replica at a time) so NCCL uses the right GID",
            )
        ]
    running = sum(1 for index in started.values() if index)
    return [
        _check(
            "roce.gid_index",
            Status.PASS,
            now,
            now,
            f"NCCL_IB_GID_INDEX={now} from the GID table; {running} of {len(started)} engines "
            "started with it (the others have not started yet)"
            if running < len(started)
            else f"NCCL_IB_GID_INDEX={now} from the GID table; every engine started with it",
        )
    ]


def _clock_check(exp: NodeExpectations, sections: Sections) -> Check:
    section = sections.get("clock")
    if section is None or section.rc != 0:
        what = "chronyc tracking" if exp.time_sync == "chrony" else "timedatectl timesync-status"
        return _check(
            "node.clock",
            Status.FAIL,
            None,
            MAX_CLOCK_OFFSET_S,
            f"{what} failed: {section.output.strip() if section else 'not probed'}; "
            "is the time service running? (role timesync)",
        )
    state = (
        parse_chrony_tracking(section.output)
        if exp.time_sync == "chrony"
        else parse_timesync_status(section.output)
    )
    if state.offset_s is None:
        return _check(
            "node.clock",
            Status.FAIL,
            None,
            MAX_CLOCK_OFFSET_S,
            "no offset in the time service's report",
        )
    offset = abs(state.offset_s)
    if offset > MAX_CLOCK_OFFSET_S:
        return _check(
            "node.clock",
            Status.FAIL,
            state.offset_s,
            MAX_CLOCK_OFFSET_S,
            f"clock {offset:.3f} s off (limit {MAX_CLOCK_OFFSET_S} s): `chronyc sources -v`; "
            "an unreachable NTP server or a firewall on UDP 123",
        )
    if not state.synchronised and not exp.lab:
        return _check(
            "node.clock",
            Status.FAIL,
            state.offset_s,
            MAX_CLOCK_OFFSET_S,
            "not synchronised to any time source: `chronyc sources -v`",
        )
    note = "" if state.synchronised else " (lab: chronyd -x, not synchronised)"
    return _check(
        "node.clock",
        Status.PASS,
        state.offset_s,
        MAX_CLOCK_OFFSET_S,
        f"offset {offset * 1000:.3f} ms from {state.source or 'its source'}{note}",
    )


def _dns_check(exp: NodeExpectations, sections: Sections) -> Check:
    section = sections.get("dns")
    if section is None:
        return _check("node.dns", Status.FAIL, None, len(exp.dns_names), "not probed")
    resolved, failed = parse_dns(section.output)
    if failed or len(resolved) < len(exp.dns_names):
        missing = failed or [n for n in exp.dns_names if n not in resolved]
        return _check(
            "node.dns",
            Status.FAIL,
            len(resolved),
            len(exp.dns_names),
            f"cannot resolve {', '.join(missing)}: check /etc/hosts (role base) and "
            "`resolvectl status`",
        )
    return _check(
        "node.dns", Status.PASS, len(resolved), len(exp.dns_names), f"{len(resolved)} names resolve"
    )


def _model_checks(exp: NodeExpectations, sections: Sections) -> list[Check]:
    checks: list[Check] = []
    for model in exp.models:
        section = sections.get(f"model:{model.name}")
        lines = section.lines if section else []
        prefix = f"model.{model.name}"
        if section is not None and "missing-dir" in lines and exp.lab:
            checks.append(
                _na(
                    f"{prefix}.files",
                    f"lab: {model.path} absent; the stand-in needs no weights",
                )
            )
            continue
        if section is None or "missing-dir" in lines:
            checks.append(
                _check(
                    f"{prefix}.files",
                    Status.FAIL,
                    "missing",
                    model.path,
                    f"{model.path} does not exist: is the storage mounted (role model_storage)?",
                )
            )
            continue
        has_config = "config-json" in lines
        if has_config or exp.lab:
            checks.append(
                _check(
                    f"{prefix}.files",
                    Status.PASS,
                    model.path,
                    model.path,
                    f"{model.path} present"
                    + ("" if has_config else " (lab: the stand-in needs no weights)"),
                )
            )
        else:
            checks.append(
                _check(
                    f"{prefix}.files",
                    Status.FAIL,
                    "no config.json",
                    "config.json",
                    f"{model.path} has no config.json: a torn or unfinished copy of the weights",
                )
            )
        if "manifest" not in lines:
            checks.append(
                _na(
                    f"{prefix}.checksum",
                    f"no {MANIFEST} under {model.path}: write one with `sha256sum * > {MANIFEST}` "
                    "where the weights were downloaded",
                )
            )
            continue
        if "checksum-skipped" in lines:
            checks.append(_na(f"{prefix}.checksum", "checksums not verified (--skip-checksums)"))
            continue
        rc_line = next((line for line in lines if line.startswith("sha256sum-rc ")), None)
        rc = int(rc_line.split()[1]) if rc_line else 1
        bad = [
            line.split(":")[0] for line in lines if line.endswith(("FAILED", "FAILED open or read"))
        ]
        if rc == 0:
            checks.append(
                _check(f"{prefix}.checksum", Status.PASS, 0, 0, f"every file matches {MANIFEST}")
            )
        else:
            listing = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            checks.append(
                _check(
                    f"{prefix}.checksum",
                    Status.FAIL,
                    len(bad) or rc,
                    0,
                    f"checksum mismatch: {listing or 'sha256sum failed'}; copy the files again "
                    "from the source",
                )
            )
    return checks


def _engine_checks(exp: NodeExpectations, sections: Sections) -> list[Check]:
    checks = []
    for engine in exp.engines:
        section = sections.get(f"engine:{engine.deployment}:{engine.replica}")
        ok = section is not None and section.rc == 0 and section.output.strip() == "200"
        detail = section.output.strip() if section else "not probed"
        checks.append(
            _check(
                f"engine.{engine.deployment}.r{engine.replica}",
                Status.PASS if ok else Status.FAIL,
                detail,
                200,
                f"/health_generate on port {engine.port} answered"
                if ok
                else f"/health_generate on port {engine.port}: {detail}; "
                f"`journalctl -u sglang-{engine.deployment}-r{engine.replica}`",
            )
        )
    return checks


def evaluate_node(
    exp: NodeExpectations,
    sections: Sections,
    *,
    burnin: Mapping[str, Any] | None = None,
    burnin_note: str | None = None,
) -> Verdict:
    """Every check for one node from its probe output (and burn-in report, when one ran).

    `burnin_note` explains a missing report ("not run: pass --burnin"); a burn-in that was
    attempted and failed is a report with `errors`, judged by `evaluate`.
    """
    verdict = Verdict(node=exp.node)
    gpu_checks, gpus = _gpu_checks(exp, sections)
    verdict.checks.extend(gpu_checks)
    verdict.checks.extend(_hgx_checks(exp, sections))

    xid_section = sections.get("xid")
    ib_section = sections.get("ibstat")
    facts = NodeFacts(
        ecc_uncorrected={g.index: g.ecc_uncorrected for g in gpus if g.ecc_uncorrected is not None}
        or None,
        xid_codes=parse_xids(xid_section.output)
        if xid_section is not None and xid_section.rc == 0
        else None,
        ib_ports=parse_ibstat(ib_section.output)
        if ib_section is not None and ib_section.rc == 0
        else None,
    )
    if burnin is not None:
        acceptance = evaluate(
            expected_model=exp.gpu_model,
            expected_count=exp.gpu_count,
            burnin=burnin,
            facts=facts,
            expected_ports=exp.rdma,
            node=exp.node,
        ).checks
    else:
        # Without a report: only the facts (ECC, XID, IB); the burn-in line says why.
        acceptance = [
            c
            for c in evaluate(
                expected_model=None,
                expected_count=0,
                burnin=None,
                facts=facts,
                expected_ports=exp.rdma,
                node=exp.node,
            ).checks
            if c.name != "gpu.checks"
        ]
        if exp.gpu_count:
            acceptance.insert(0, _na("gpu.burnin", burnin_note or "burn-in not run"))
        if not gpus:
            acceptance = [c for c in acceptance if c.name != "gpu.ecc"]
    verdict.checks.extend(acceptance)
    verdict.checks.extend(_gid_checks(exp, sections))
    verdict.checks.append(_clock_check(exp, sections))
    verdict.checks.append(_dns_check(exp, sections))
    verdict.checks.extend(_model_checks(exp, sections))
    verdict.checks.extend(_engine_checks(exp, sections))
    return verdict


def node_ready(
    spec: ClusterSpec, node: Node | str, sections: Sections | str, **options: Any
) -> Verdict:
    """For the deploy: judge a node from the `NodeHealth` fact's output before it joins the
    load balancer. `sections` is the fact's value (or the raw probe output)."""
    target = spec.node(node) if isinstance(node, str) else node
    parsed = parse_sections(sections) if isinstance(sections, str) else sections
    return evaluate_node(expectations(spec, target, **options), parsed)


# --- serving ---------------------------------------------------------------------------------------


@dataclass
class LoadSample:
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class LoadSummary:
    requests: int
    failed: int
    duration_s: float
    output_tokens_per_s: float
    ttft_s: Mapping[str, float]
    itl_s: Mapping[str, float]
    errors: tuple[str, ...] = ()
    tool: str = "built-in"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)} if values else {}


def summarize_load(samples: Sequence[LoadSample], duration_s: float) -> LoadSummary:
    ok = [s for s in samples if s.ok]
    return LoadSummary(
        requests=len(samples),
        failed=len(samples) - len(ok),
        duration_s=duration_s,
        output_tokens_per_s=sum(s.tokens for s in ok) / duration_s if duration_s > 0 else 0.0,
        ttft_s=_percentiles([s.ttft_s for s in ok if s.ttft_s is not None]),
        itl_s=_percentiles([v for s in ok for v in s.itl_s]),
        errors=tuple(sorted({s.error for s in samples if s.error})),
    )


def parse_bench_serving(output: str) -> LoadSummary | None:
    """The JSON line `sglang.bench_serving --output-file` writes (the last one wins)."""
    record: dict[str, Any] | None = None
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                candidate = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(candidate, dict) and "completed" in candidate:
                record = candidate
    if record is None:
        return None

    def ms(prefix: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for label, key in (
            ("p50", f"median_{prefix}_ms"),
            ("p95", f"p95_{prefix}_ms"),
            ("p99", f"p99_{prefix}_ms"),
        ):
            value = record.get(key) if record else None
            if isinstance(value, (int, float)):
                found[label] = float(value) / 1000
        return found

    completed = int(record.get("completed", 0))
    prompts = int(record.get("num_prompts", completed) or completed)
    return LoadSummary(
        requests=prompts,
        failed=max(prompts - completed, 0),
        duration_s=float(record.get("duration", 0.0)),
        output_tokens_per_s=float(record.get("output_throughput", 0.0)),
        ttft_s=ms("ttft"),
        itl_s=ms("itl"),
        tool="sglang.bench_serving",
    )


def load_check(summary: LoadSummary | None, note: str = "") -> Check:
    if summary is None:
        return _check(
            "serving.load", Status.FAIL, None, None, f"load test gave no result {note}".strip()
        )
    p95 = summary.ttft_s.get("p95") or summary.ttft_s.get("p99")
    if not summary.ttft_s:
        figures = f"{summary.requests} requests ({summary.tool}), none answered"
    else:
        figures = (
            f"{summary.requests} requests ({summary.tool}), {summary.output_tokens_per_s:.1f} tok/s, "
            f"TTFT p50/p95 {summary.ttft_s.get('p50', math.nan):.3f}/{p95 or math.nan:.3f} s, "
            f"ITL p50/p95 {summary.itl_s.get('p50', math.nan) * 1000:.1f}/"
            f"{summary.itl_s.get('p95', summary.itl_s.get('p99', math.nan)) * 1000:.1f} ms"
        )
    if summary.failed or summary.requests == 0:
        return _check(
            "serving.load",
            Status.FAIL,
            summary.failed,
            0,
            f"{summary.failed} of {summary.requests} requests failed ({'; '.join(summary.errors[:3])}); "
            + figures,
        )
    if p95 is not None and p95 > MAX_TTFT_P95_S:
        return _check(
            "serving.load",
            Status.FAIL,
            p95,
            MAX_TTFT_P95_S,
            f"TTFT p95 {p95:.2f} s above {MAX_TTFT_P95_S} s; " + figures,
        )
    return _check("serving.load", Status.PASS, summary.output_tokens_per_s, None, figures)


# --- I/O: SSH ----------------------------------------------------------------------------------------


def node_address(spec: ClusterSpec, node: Node) -> str:
    from infra.inventory import node_addresses

    addresses = node_addresses(spec)
    if node.name not in addresses:
        raise UserError(
            f"no address for node {node.name}",
            [
                Problem(
                    "the spec has no address for it and Pulumi's outputs name none",
                    path=f"nodes[{node.name}].address",
                    hint="run where the `pulumi` CLI can read the stack (DEEPFLEET_STACK names "
                    "it; the spec's name by default), or save `pulumi stack output --json > "
                    "outputs.json` and set DEEPFLEET_OUTPUTS=outputs.json",
                )
            ],
        )
    return addresses[node.name]


def ssh_command(spec: ClusterSpec, address: str, remote: str) -> list[str]:
    """`ssh` with exactly pyinfra's connection data (user, port, key, host key policy)."""
    from infra.inventory import connection_data

    data = connection_data(spec, address)
    command = [
        "ssh",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=10",
        "-o", "ServerAliveInterval=15",
        "-p", str(data["ssh_port"]),
    ]  # fmt: skip
    if "ssh_key" in data:
        command += ["-i", data["ssh_key"], "-o", "IdentitiesOnly=yes"]
    if data.get("ssh_strict_host_key_checking") == "no":
        command += ["-o", "StrictHostKeyChecking=no"]
    if "ssh_known_hosts_file" in data:
        command += ["-o", f"UserKnownHostsFile={data['ssh_known_hosts_file']}"]
    command += ["-o", "LogLevel=ERROR", f"{data['ssh_user']}@{data['ssh_hostname']}"]
    sudo = "sudo -n " if data.get("_sudo") else ""
    return [*command, sudo + remote]


class Unreachable(Exception):
    pass


Runner = Callable[[list[str], str, float], "subprocess.CompletedProcess[str]"]


def _run(command: list[str], stdin: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_probe(
    spec: ClusterSpec, node: Node, exp: NodeExpectations, runner: Runner = _run
) -> dict[str, Section]:
    address = node_address(spec, node)
    try:
        result = runner(ssh_command(spec, address, "sh -s"), probe_script(exp), 3600)
    except subprocess.TimeoutExpired as exc:
        raise Unreachable(f"{node.name} ({address}): probe timed out") from exc
    if result.returncode == SSH_UNREACHABLE:
        raise Unreachable(f"{node.name} ({address}): {result.stderr.strip() or 'ssh failed'}")
    return parse_sections(result.stdout)


def burnin_command(image: str) -> str:
    return (
        f"mkdir -p {BURNIN_REMOTE_DIR} && cat > {BURNIN_REMOTE_DIR}/burnin.py && "
        f"docker run --rm --gpus all --ipc=host --network host "
        f"-v {BURNIN_REMOTE_DIR}:{BURNIN_REMOTE_DIR}:ro {shlex.quote(image)} "
        f"python3 {BURNIN_REMOTE_DIR}/burnin.py --json"
    )


def run_burnin(spec: ClusterSpec, node: Node, image: str, runner: Runner = _run) -> dict[str, Any]:
    """burnin.py in the engine image on the node; a failure becomes a report with `errors`."""
    address = node_address(spec, node)
    script = BURNIN_SCRIPT.read_text(encoding="utf-8")
    command = ssh_command(spec, address, f"sh -c {shlex.quote(burnin_command(image))}")
    try:
        result = runner(command, script, 1800)
    except subprocess.TimeoutExpired:
        return {"errors": ["burn-in timed out after 30 minutes"], "gpus": []}
    if result.returncode == SSH_UNREACHABLE:
        raise Unreachable(f"{node.name} ({address}): {result.stderr.strip() or 'ssh failed'}")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return {
            "errors": [f"burn-in gave no report: {' / '.join(tail) or 'no output'}"],
            "gpus": [],
        }
    return report if isinstance(report, dict) else {"errors": ["burn-in report is not an object"]}


# --- the all-reduce across the nodes of a multi-node replica ---------------------------------------

ALLREDUCE_TIMEOUT_S = 900
"""SSH limit per node: container start, the rendezvous (burnin.RENDEZVOUS_TIMEOUT_S) and the
sweep, which takes seconds; a node that hangs longer is reported, not waited for."""
FREE_PORT_COMMAND = "python3 -c " + shlex.quote(
    "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
)


@dataclass(frozen=True)
class ReplicaNodes:
    """A replica that spans several nodes: what its all-reduce check needs from the spec."""

    deployment: str
    replica: int
    nodes: tuple[str, ...]
    """In rank order: nodes[0] is node rank 0, which hosts the rendezvous."""
    master_addr: str
    """Rank 0's address on the network the engine's NCCL uses (its --dist-init-addr host)."""
    env: Mapping[str, Mapping[str, str]]
    """Per node: the engine's NCCL environment (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...)."""
    rdma: frozenset[str]
    """Nodes with RDMA ports: their container gets /dev/infiniband, as the engine's does."""
    gid_probe: Mapping[str, Sequence[str]]
    """Per RoCE node whose engine reads NCCL_IB_GID_INDEX at start: the same probe, writing
    `BURNIN_NCCL_ENV` for the all-reduce's container."""
    image: str
    gpu_model: str | None
    gpus_per_node: int

    @property
    def label(self) -> str:
        return f"{self.deployment} replica {self.replica}"


def multi_node_replicas(spec: ClusterSpec) -> list[ReplicaNodes]:
    """Every replica of more than one node, with the addresses and environment its engines use
    (infra/sglang.py), so the all-reduce takes the path the engine's NCCL takes."""
    from infra.inventory import node_addresses
    from infra.sglang import launches_for_spec

    launches = launches_for_spec(spec, node_addresses(spec))
    groups: list[ReplicaNodes] = []
    for deployment in spec.deployments:
        for number, replica in enumerate(deployment.replicas, start=1):
            if len(replica) < 2:
                continue
            mine = {
                launch.node: launch
                for launch in launches
                if launch.deployment == deployment.name and launch.replica == number
            }
            head = mine[replica[0]]
            assert head.dist_init_addr is not None  # set for every multi-node replica
            first = spec.node(replica[0])
            groups.append(
                ReplicaNodes(
                    deployment=deployment.name,
                    replica=number,
                    nodes=tuple(replica),
                    master_addr=head.dist_init_addr.rsplit(":", 1)[0],
                    env={name: dict(mine[name].env) for name in replica},
                    rdma=frozenset(name for name in replica if spec.node(name).rdma),
                    gid_probe={
                        name: nccl_env_probe(spec.node(name), BURNIN_NCCL_ENV)
                        for name in replica
                        if mine[name].nccl_env_command
                    },
                    image=deployment.image,
                    gpu_model=first.gpus.model if first.gpus else None,
                    gpus_per_node=first.gpus.count if first.gpus else 0,
                )
            )
    return groups


def allreduce_command(group: ReplicaNodes, node: str, port: int) -> str:
    """The shell command one node runs (burnin.py on stdin): its part of the all-reduce, in the
    engine image, with the engine's NCCL environment and RDMA devices."""
    docker = ["docker", "run", "--rm", "--gpus", "all", "--ipc=host", "--network", "host"]
    docker += ["--ulimit", "memlock=-1"]
    if node in group.rdma:
        docker += ["--device", "/dev/infiniband", "--cap-add", "IPC_LOCK"]
    steps = [f"mkdir -p {BURNIN_REMOTE_DIR}", f"cat > {BURNIN_REMOTE_DIR}/burnin.py"]
    probe = group.gid_probe.get(node)
    if probe:
        # Its one line of output goes to stderr: stdout is burnin.py's JSON report.
        steps.append(shlex.join(probe) + " >&2")
        docker += ["--env-file", BURNIN_NCCL_ENV]
    env = group.env[node]
    for key in sorted(env):
        docker += ["-e", f"{key}={env[key]}"]
    docker += ["-v", f"{BURNIN_REMOTE_DIR}:{BURNIN_REMOTE_DIR}:ro", group.image]
    docker += ["python3", f"{BURNIN_REMOTE_DIR}/burnin.py", "--json", "--allreduce-only"]
    docker += ["--ranks", str(group.gpus_per_node), "--nnodes", str(len(group.nodes))]
    docker += ["--node-rank", str(group.nodes.index(node))]
    docker += ["--master-addr", group.master_addr, "--master-port", str(port)]
    return " && ".join([*steps, shlex.join(docker)])


def _parse_port(output: str) -> int | None:
    text = output.strip()
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def _allreduce_failed(group: ReplicaNodes, message: str) -> Verdict:
    """The replica's verdict when its all-reduce could not even start."""
    verdict = Verdict(node=group.label)
    verdict.checks.append(_check("nccl.allreduce_nodes", Status.FAIL, None, "ok", message))
    return verdict


def run_multi_node_allreduce(
    spec: ClusterSpec, group: ReplicaNodes, runner: Runner = _run
) -> Verdict:
    """Start burnin.py on every node of the replica at once and judge rank 0's figures.

    The port is one that rank 0's node reports free just before the start (closed again at
    once; the rendezvous binds it seconds later). A node that cannot be reached, gives no
    report or exits non-zero is named in the verdict; the others' ranks then time out.
    """
    head = spec.node(group.nodes[0])
    head_address = node_address(spec, head)
    found = runner(ssh_command(spec, head_address, FREE_PORT_COMMAND), "", 60)
    port = _parse_port(found.stdout) if found.returncode == 0 else None
    if port is None:
        why = (found.stderr or found.stdout).strip().splitlines()[-1:] or ["no output"]
        return _allreduce_failed(
            group,
            f"no free port from {head.name} ({head_address}): {why[0]}; "
            "it needs python3 on the node",
        )
    script = BURNIN_SCRIPT.read_text(encoding="utf-8")

    def one(name: str) -> tuple[str, dict[str, Any] | None, str | None]:
        address = node_address(spec, spec.node(name))
        remote = f"sh -c {shlex.quote(allreduce_command(group, name, port))}"
        try:
            result = runner(ssh_command(spec, address, remote), script, ALLREDUCE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return name, None, f"timed out after {ALLREDUCE_TIMEOUT_S} s"
        tail = " / ".join((result.stderr or "").strip().splitlines()[-3:])
        if result.returncode == SSH_UNREACHABLE:
            return name, None, f"unreachable ({address}): {tail or 'ssh failed'}"
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            return name, None, f"exit {result.returncode}, no report: {tail or 'no output'}"
        if not isinstance(report, dict):
            return name, None, "the report is not a JSON object"
        return name, report, None

    # All at once: each node's ranks wait in the rendezvous for the other nodes' ranks.
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(group.nodes)) as pool:
        outcomes = list(pool.map(one, group.nodes))
    return evaluate_multi_node_allreduce(
        replica=group.label,
        nodes=group.nodes,
        gpus_per_node=group.gpus_per_node,
        expected_model=group.gpu_model,
        reports={name: report for name, report, _ in outcomes},
        problems={name: problem for name, _, problem in outcomes if problem},
    )


def replica_allreduce_checks(
    spec: ClusterSpec, checked: Sequence[str], unreachable: Mapping[str, str], runner: Runner = _run
) -> list[Verdict]:
    """The all-reduce of every multi-node replica, or why it was not run."""
    verdicts: list[Verdict] = []
    for group in multi_node_replicas(spec):
        missing = [name for name in group.nodes if name not in checked]
        down = [name for name in group.nodes if name in unreachable]
        reason = None
        if group.gpus_per_node == 0:
            reason = "no GPUs in the spec for this replica's nodes"
        elif missing:
            flags = " ".join(f"--node {name}" for name in group.nodes)
            reason = (
                f"needs every node of the replica; {', '.join(missing)} not selected "
                f"(use {flags}, or no --node)"
            )
        elif down:
            reason = f"{', '.join(down)} unreachable"
        if reason is not None:
            verdict = Verdict(node=group.label)
            verdict.checks.append(_na("nccl.allreduce_nodes", f"not run: {reason}"))
            verdicts.append(verdict)
            continue
        try:
            verdicts.append(run_multi_node_allreduce(spec, group, runner))
        except subprocess.TimeoutExpired:
            verdicts.append(
                _allreduce_failed(group, f"{group.nodes[0]} did not answer for a free port")
            )
    return verdicts


# --- I/O: serving ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    url: str
    api_key: str | None
    model: str
    image: str | None
    bench_node: str | None
    model_dir: str | None


def read_secret(ref: SecretRef | None) -> str | None:
    if ref is None:
        return None
    if ref.env:
        return os.environ.get(ref.env)
    path = Path(ref.file or "").expanduser()
    path = path if path.is_absolute() else PROJECT_DIR / path
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def serving_endpoint(spec: ClusterSpec) -> Endpoint | None:
    lb = spec.load_balancer
    chat = [d for d in spec.deployments if not d.embedding]
    if lb is None or not chat:
        return None
    host = str(lb.vip.address) if lb.vip is not None else node_address(spec, spec.node(lb.nodes[0]))
    scheme = "https" if lb.tls else "http"
    deployment = chat[0]
    model = spec.model(deployment.model)
    storage = spec.storage_named(model.storage)
    return Endpoint(
        url=f"{scheme}://{host}:{lb.port}",
        api_key=read_secret(lb.api_key) or read_secret(deployment.api_key),
        model=model.name,
        image=deployment.image,
        bench_node=deployment.replicas[0][0],
        model_dir=f"{(storage.local_cache or storage.mount_point).rstrip('/')}/{model.path}",
    )


def _context() -> ssl.SSLContext:
    # Our own load balancer, reached by address: its certificate names the public host name.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _request(endpoint: Endpoint, path: str, body: Mapping[str, Any] | None, timeout: float) -> Any:
    headers = {"Content-Type": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(endpoint.url + path, data=data, headers=headers)
    return urllib.request.urlopen(request, timeout=timeout, context=_context())


def _stream_chat(endpoint: Endpoint, prompt: str, max_tokens: int) -> LoadSample:
    body = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    start = time.perf_counter()
    sample = LoadSample(ok=False)
    last: float | None = None
    try:
        with _request(endpoint, "/v1/chat/completions", body, 300) as response:
            for raw in response:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                choices = chunk.get("choices") or []
                delta = choices[0].get("delta", {}) if choices else {}
                if not delta.get("content"):
                    continue
                now = time.perf_counter()
                if last is None:
                    sample.ttft_s = now - start
                else:
                    sample.itl_s.append(now - last)
                last = now
                sample.tokens += 1
        sample.ok = sample.tokens > 0
        if not sample.ok:
            sample.error = "no tokens streamed"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        sample.error = str(getattr(exc, "reason", exc))
    return sample


def builtin_load(
    endpoint: Endpoint, requests: int = 32, concurrency: int = 4, max_tokens: int = 32
) -> LoadSummary:
    """A small bounded load: REQUESTS streamed chats, CONCURRENCY at a time (the lab's stand-in
    has no bench_serving)."""
    samples: list[LoadSample] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            sample = _stream_chat(endpoint, f"deepfleet check {index}: count to ten.", max_tokens)
            with lock:
                samples.append(sample)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize_load(samples, time.perf_counter() - start)


def bench_serving_command(endpoint: Endpoint, prompts: int = 64, concurrency: int = 8) -> str:
    assert endpoint.image and endpoint.model_dir
    out = "/tmp/deepfleet-bench.jsonl"
    return (
        "docker run --rm --network host -e OPENAI_API_KEY "
        f"-v {shlex.quote(endpoint.model_dir)}:/models:ro {shlex.quote(endpoint.image)} "
        "sh -c "
        + shlex.quote(
            f"python3 -m sglang.bench_serving --backend sglang-oai-chat --base-url {endpoint.url} "
            f"--model {endpoint.model} --tokenizer /models --dataset-name random-ids "
            "--random-input-len 256 --random-output-len 64 "
            f"--num-prompts {prompts} --max-concurrency {concurrency} "
            f"--output-file {out} >&2 && cat {out}"
        )
    )


def serving_checks(spec: ClusterSpec, runner: Runner = _run) -> list[Check]:
    endpoint = serving_endpoint(spec)
    if endpoint is None:
        return [_na("serving", "no load balancer or chat deployment in the spec")]
    checks: list[Check] = []
    try:
        with _request(endpoint, "/health_generate", None, 120) as response:
            checks.append(
                _check("serving.health_generate", Status.PASS, response.status, 200,
                       f"{endpoint.url}/health_generate answered")
            )  # fmt: skip
    except (urllib.error.URLError, OSError) as exc:
        checks.append(
            _check("serving.health_generate", Status.FAIL, str(exc), 200,
                   f"{endpoint.url}/health_generate: {exc}")
        )  # fmt: skip
    body = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": "Say OK."}],
        "max_tokens": 16,
    }
    try:
        with _request(endpoint, "/v1/chat/completions", body, 300) as response:
            reply = json.loads(response.read())
        text = reply["choices"][0]["message"]["content"] or ""
        checks.append(
            _check("serving.chat", Status.PASS, len(text), None,
                   f"chat completion from {endpoint.model}: {text[:60]!r}")
        )  # fmt: skip
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as exc:
        hint = (
            " (no API key: set the load balancer's api_key secret)" if not endpoint.api_key else ""
        )
        checks.append(
            _check(
                "serving.chat", Status.FAIL, str(exc), None, f"chat completion failed: {exc}{hint}"
            )
        )
    if spec.is_lab or endpoint.bench_node is None:
        checks.append(load_check(builtin_load(endpoint)))
        return checks
    node = spec.node(endpoint.bench_node)
    remote = "sh -c " + shlex.quote(
        "read -r OPENAI_API_KEY; export OPENAI_API_KEY; " + bench_serving_command(endpoint)
    )
    result = runner(
        ssh_command(spec, node_address(spec, node), remote), (endpoint.api_key or "") + "\n", 1800
    )
    tail = " / ".join(result.stderr.strip().splitlines()[-3:])
    checks.append(load_check(parse_bench_serving(result.stdout), f"(on {node.name}: {tail})"))
    return checks


# --- the whole check -------------------------------------------------------------------------------


@dataclass
class Report:
    nodes: list[Verdict] = field(default_factory=list)
    serving: Verdict | None = None
    unreachable: dict[str, str] = field(default_factory=dict)
    replicas: list[Verdict] = field(default_factory=list)
    """With --burnin: the all-reduce across the nodes of each multi-node replica."""

    @property
    def exit_code(self) -> int:
        if self.unreachable:
            return 2
        verdicts = [*self.nodes, *self.replicas, *([self.serving] if self.serving else [])]
        return 0 if all(v.passed for v in verdicts) else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": {0: "pass", 1: "fail", 2: "unreachable"}[self.exit_code],
            "nodes": [v.to_dict() for v in self.nodes],
            "replicas": [v.to_dict() for v in self.replicas],
            "serving": self.serving.to_dict() if self.serving else None,
            "unreachable": self.unreachable,
        }


@dataclass(frozen=True)
class Options:
    nodes: tuple[str, ...] = ()
    burnin: bool = False
    serving: bool = True
    verify_checksums: bool = True
    dns_names: tuple[str, ...] = ()


def selected_nodes(spec: ClusterSpec, names: Sequence[str]) -> list[Node]:
    known = {n.name for n in spec.nodes}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(
            "unknown node",
            [
                Problem(
                    f"no node named {name!r} in the spec", hint=f"nodes: {', '.join(sorted(known))}"
                )
                for name in unknown
            ],
        )
    return [n for n in spec.nodes if not names or n.name in names]


def check_node(spec: ClusterSpec, node: Node, options: Options, runner: Runner = _run) -> Verdict:
    exp = expectations(
        spec, node, dns_names=options.dns_names or None, verify_checksums=options.verify_checksums
    )
    sections = run_probe(spec, node, exp, runner)
    burnin: dict[str, Any] | None = None
    note = "not run: pass --burnin (it loads every GPU; never on a node that serves)"
    if exp.gpu_count and options.burnin:
        if exp.image is None:
            note = "no deployment on this node: no engine image to run the burn-in in"
        else:
            burnin = run_burnin(spec, node, exp.image, runner)
    return evaluate_node(exp, sections, burnin=burnin, burnin_note=note)


def check_cluster(spec: ClusterSpec, options: Options, runner: Runner = _run) -> Report:
    report = Report()
    nodes = selected_nodes(spec, options.nodes)
    for node in nodes:
        try:
            report.nodes.append(check_node(spec, node, options, runner))
        except Unreachable as exc:
            report.unreachable[node.name] = str(exc)
    if options.burnin:
        # After every node's own burn-in, so a replica's nodes are idle when they meet.
        report.replicas.extend(
            replica_allreduce_checks(spec, [n.name for n in nodes], report.unreachable, runner)
        )
    if options.serving and not options.nodes:
        serving = Verdict(node="serving")
        serving.checks.extend(serving_checks(spec, runner))
        report.serving = serving
    return report
