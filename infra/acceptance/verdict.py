"""Pass/fail for one node: the spec's GPUs against a burn-in report and the node's health facts.

Pure: no I/O beyond `load_burnin`, no GPU. Inputs are what the spec promises (GPU model and count,
RDMA ports) and what was read on the node (a `burnin.py` JSON report; optionally ECC and XID
counts and InfiniBand port states). The answer is a list of checks, each with its status, what
was measured, what was expected and a message a person can act on, and one overall status.

    verdict = evaluate(expected_model="H100", expected_count=8, burnin=report, facts=facts)
    print(verdict.render()); sys.exit(0 if verdict.passed else 1)

A node whose spec lists no GPUs (a lab VM, a load balancer) gets its GPU checks as
"not-applicable"; its IB, ECC and XID checks still run when facts are given.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from infra.acceptance.thresholds import (
    MAX_MATMUL_REL_ERROR,
    MULTI_NODE_ALLREDUCE_BUSBW_GBPS_MIN,
    THRESHOLDS,
    GpuThresholds,
    gpu_model_from_name,
    model_key,
    multi_node_busbw_min,
    thresholds_for,
)
from infra.errors import Problem, UserError

BURNIN_SCHEMA = "deepfleet.burnin/1"

Value = float | int | str | None


class Status(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    NOT_APPLICABLE = "not-applicable"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    measured: Value
    expected: Value
    message: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


@dataclass(frozen=True)
class IbPort:
    """One RDMA port as `ibstat` or /sys/class/infiniband/<dev>/ports/<n>/ show it."""

    device: str
    port: int = 1
    state: str = ""
    """"Active", "Down", "Init", ... (sysfs prints "4: ACTIVE"; either form works)."""
    physical_state: str | None = None
    """"LinkUp", "Disabled", "Polling", ... (sysfs "5: LinkUp")."""
    rate_gbps: float | None = None

    @property
    def label(self) -> str:
        return f"{self.device}/{self.port}"


@dataclass(frozen=True)
class ExpectedPort:
    """An RDMA port the spec promises (spec.nodes[].rdma[])."""

    device: str
    port: int = 1
    rate_gbps: float | None = None

    @property
    def label(self) -> str:
        return f"{self.device}/{self.port}"


@dataclass(frozen=True)
class NodeFacts:
    """Health facts read on the node besides the burn-in; None means "not collected"."""

    ecc_uncorrected: Mapping[int, int] | None = None
    """Volatile uncorrected ECC errors per GPU index (nvidia-smi)."""
    xid_codes: Sequence[int] | None = None
    """NVIDIA XID codes found in the kernel log since boot (`dmesg | grep NVRM: Xid`)."""
    ib_ports: Sequence[IbPort] | None = None


# XIDs that point at the hardware (or its memory) rather than at a program.
HARDWARE_XIDS: Mapping[int, str] = {
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row-remapping event",
    64: "ECC page retirement or row-remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


@dataclass
class Verdict:
    node: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.status is Status.FAIL]

    @property
    def status(self) -> Status:
        if self.failures:
            return Status.FAIL
        if all(check.status is Status.NOT_APPLICABLE for check in self.checks):
            return Status.NOT_APPLICABLE
        return Status.PASS

    @property
    def passed(self) -> bool:
        return self.status is not Status.FAIL

    def check(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r}; have: {', '.join(c.name for c in self.checks)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "status": self.status.value,
            "checks": [check.to_dict() for check in self.checks],
        }

    def render(self) -> str:
        width = max((len(check.name) for check in self.checks), default=10)
        lines = [f"{self.node or 'node'}: {self.status.value.upper()}"]
        for check in self.checks:
            lines.append(f"  {check.status.value:<14} {check.name:<{width}}  {check.message}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.3g}"


_GPU_HINT = (
    "look for power/thermal throttling (nvidia-smi -q -d PERFORMANCE), a wrong power limit or "
    "a bad board"
)
_FABRIC_HINT = (
    "look for a degraded RDMA port (ibstat rate, lane width), NCCL falling back to TCP sockets "
    "(NCCL_DEBUG=INFO prints NET/IB or NET/Socket), or a congested switch"
)


def _at_least(
    name: str, measured: Any, minimum: float, unit: str, what: str, hint: str = _GPU_HINT
) -> Check:
    if not isinstance(measured, (int, float)):
        return Check(name, Status.FAIL, None, minimum, f"{what}: no figure in the burn-in report")
    if measured >= minimum:
        return Check(
            name,
            Status.PASS,
            measured,
            minimum,
            f"{what} {_fmt(measured)} {unit} (minimum {_fmt(minimum)})",
        )
    return Check(
        name,
        Status.FAIL,
        measured,
        minimum,
        f"{what} {_fmt(measured)} {unit} is below the minimum {_fmt(minimum)} {unit} "
        f"({measured / minimum:.0%} of it); {hint}",
    )


def _gpu_checks(
    expected_model: str | None,
    expected_count: int,
    burnin: Mapping[str, Any] | None,
    table: Mapping[str, GpuThresholds],
) -> list[Check]:
    measured_count = None if burnin is None else burnin.get("gpu_count")
    if expected_count == 0:
        if measured_count:
            return [
                Check(
                    "gpu.count",
                    Status.FAIL,
                    measured_count,
                    0,
                    f"the spec lists no GPUs for this node but the burn-in found "
                    f"{measured_count}; add them to the node's `gpus:` or check the inventory",
                )
            ]
        return [
            Check(
                "gpu.checks",
                Status.NOT_APPLICABLE,
                measured_count,
                0,
                "no GPUs in the spec for this node: GPU checks not applicable",
            )
        ]
    if burnin is None:
        return [
            Check(
                "gpu.burnin",
                Status.FAIL,
                None,
                expected_count,
                f"no burn-in report for a node that should have {expected_count} GPUs; "
                "run burnin.py in the engine container on it",
            )
        ]

    checks: list[Check] = []
    for error in burnin.get("errors", []):
        checks.append(Check("gpu.burnin", Status.FAIL, str(error), None, f"burn-in: {error}"))

    count_status = Status.PASS if measured_count == expected_count else Status.FAIL
    count_msg = f"{measured_count} of {expected_count} GPUs visible"
    if count_status is Status.FAIL:
        count_msg += (
            "; a missing GPU: check `nvidia-smi -L`, the kernel log for XID 79 (fallen off "
            "the bus), and reseat or replace it"
            if isinstance(measured_count, int) and measured_count < expected_count
            else "; the spec's `gpus.count` does not match the node"
        )
    checks.append(Check("gpu.count", count_status, measured_count, expected_count, count_msg))

    gpus: list[Mapping[str, Any]] = list(burnin.get("gpus", []))
    limits = thresholds_for(expected_model, table) if expected_model else None
    for gpu in gpus:
        prefix = f"gpu{gpu.get('index', '?')}"
        found = gpu_model_from_name(str(gpu.get("name", "")), gpu.get("memory_total_bytes"))
        if expected_model is not None:
            same = found is not None and model_key(found) == model_key(expected_model)
            checks.append(
                Check(
                    f"{prefix}.model",
                    Status.PASS if same else Status.FAIL,
                    gpu.get("name"),
                    expected_model,
                    f"{gpu.get('name')} is {found or 'an unknown model'}"
                    + ("" if same else f", the spec says {expected_model}"),
                )
            )
        if "error" in gpu:
            checks.append(
                Check(f"{prefix}.burnin", Status.FAIL, gpu["error"], None, str(gpu["error"]))
            )
            continue
        if limits is None:
            reason = (
                f"no measured minimums for {expected_model}: run burnin.py on a healthy node "
                "and add its figures to infra/acceptance/thresholds.py"
                if expected_model
                else "no GPU model in the spec"
            )
            for metric in ("matmul_tflops", "copy_gbps"):
                checks.append(
                    Check(
                        f"{prefix}.{metric}",
                        Status.NOT_APPLICABLE,
                        gpu.get(metric),
                        None,
                        reason,
                    )
                )
        else:
            checks.append(
                _at_least(
                    f"{prefix}.matmul_tflops",
                    gpu.get("matmul_tflops"),
                    limits.matmul_tflops_min,
                    "TFLOP/s",
                    "bf16 matmul",
                )
            )
            checks.append(
                _at_least(
                    f"{prefix}.copy_gbps",
                    gpu.get("copy_gbps"),
                    limits.copy_gbps_min,
                    "GB/s",
                    "memory copy",
                )
            )
        error = gpu.get("matmul_rel_error")
        if isinstance(error, (int, float)):
            good = error <= MAX_MATMUL_REL_ERROR  # NaN compares False: fails
            checks.append(
                Check(
                    f"{prefix}.matmul_accuracy",
                    Status.PASS if good else Status.FAIL,
                    error,
                    MAX_MATMUL_REL_ERROR,
                    f"relative error {error:.2g} vs float64"
                    + ("" if good else ": wrong results, replace the GPU"),
                )
            )
        if gpu.get("copy_correct") is False:
            checks.append(
                Check(
                    f"{prefix}.copy_correct",
                    Status.FAIL,
                    False,
                    True,
                    "copied data differs from its source: memory fault",
                )
            )
    checks.extend(_allreduce_checks(burnin, expected_count, limits))
    return checks


def _allreduce_checks(
    burnin: Mapping[str, Any], expected_count: int, limits: GpuThresholds | None
) -> list[Check]:
    allreduce: Mapping[str, Any] = burnin.get("allreduce") or {}
    status = allreduce.get("status")
    if expected_count < 2 or status in ("not-applicable", "skipped"):
        return [
            Check(
                "nccl.allreduce",
                Status.NOT_APPLICABLE,
                None,
                None,
                allreduce.get("reason") or "not applicable (1 GPU)",
            )
        ]
    if status != "ok":
        return [
            Check(
                "nccl.allreduce",
                Status.FAIL,
                status,
                "ok",
                f"all-reduce {status or 'missing'}: {allreduce.get('reason', 'no result')}; "
                "check NVLink/NVSwitch (nvidia-smi nvlink -s, fabric manager) and NCCL_DEBUG=INFO",
            )
        ]
    rows: Sequence[Mapping[str, Any]] = allreduce.get("results", [])
    checks = [
        Check(
            "nccl.allreduce",
            Status.PASS,
            f"{len(rows)} sizes",
            "correct sums",
            f"all-reduce across {allreduce.get('ranks')} GPUs gave correct sums",
        )
    ]
    peak = allreduce.get("peak_busbw_gbps")
    if limits is None or limits.allreduce_busbw_gbps_min is None:
        checks.append(
            Check(
                "nccl.allreduce_busbw",
                Status.NOT_APPLICABLE,
                peak,
                None,
                f"peak bus bandwidth {_fmt(peak) if isinstance(peak, (int, float)) else '?'} GB/s;"
                " no measured minimum for this model yet (needs a multi-GPU burn-in)",
            )
        )
    else:
        checks.append(
            _at_least(
                "nccl.allreduce_busbw",
                peak,
                limits.allreduce_busbw_gbps_min,
                "GB/s",
                "all-reduce peak bus bandwidth",
            )
        )
    return checks


def evaluate_multi_node_allreduce(
    *,
    replica: str,
    nodes: Sequence[str],
    gpus_per_node: int,
    expected_model: str | None,
    reports: Mapping[str, Mapping[str, Any] | None],
    problems: Mapping[str, str] | None = None,
    table: Mapping[tuple[str, int, int], float] = MULTI_NODE_ALLREDUCE_BUSBW_GBPS_MIN,
) -> Verdict:
    """The all-reduce across the nodes of one replica, from the reports of
    `burnin.py --allreduce-only --nnodes N --node-rank R` run on every node at once.

    `nodes` are in rank order (node rank 0 first); `reports` hold what each node printed (None:
    no report came back) and `problems` why a node's run failed (exit status, stderr tail). The
    figures are rank 0's: every rank reduced them across the whole world, so they are the same
    on every node.
    """
    verdict = Verdict(node=replica)
    world = len(nodes) * gpus_per_node
    shape = f"{len(nodes)} nodes x {gpus_per_node} GPUs"
    head_name = nodes[0] if nodes else "?"
    allreduce: Mapping[str, Any] = (reports.get(head_name) or {}).get("allreduce") or {}

    def trouble(node: str) -> str | None:
        return (problems or {}).get(node) or _report_problem(reports.get(node))

    peers = [f"{node}: {trouble(node)}" for node in nodes[1:] if trouble(node)]
    ok = allreduce.get("status") == "ok"
    right_size = allreduce.get("ranks") == world
    # A node that failed while rank 0 says "ok" is still a failure: its part is unknown.
    if not (ok and right_size) or peers:
        if not ok:
            rank0 = allreduce.get("reason") or trouble(head_name) or "no all-reduce result"
        elif not right_size:
            rank0 = f"{allreduce.get('ranks')} ranks instead of {world}"
        else:
            rank0 = "finished"
        verdict.checks.append(
            Check(
                "nccl.allreduce_nodes",
                Status.FAIL,
                allreduce.get("status"),
                "ok",
                f"all-reduce across {shape} failed; {head_name} (rank 0): {rank0}"
                + "".join(f"; {peer}" for peer in peers)
                + "; check the RDMA ports (ibstat), NCCL_SOCKET_IFNAME/NCCL_IB_HCA, that the "
                "nodes reach each other on the master port, and NCCL_DEBUG=INFO",
            )
        )
        return verdict
    rows: Sequence[Mapping[str, Any]] = allreduce.get("results", [])
    verdict.checks.append(
        Check(
            "nccl.allreduce_nodes",
            Status.PASS,
            f"{len(rows)} sizes",
            "correct sums",
            f"all-reduce across {shape} ({world} ranks, {', '.join(nodes)}) gave correct sums",
        )
    )
    peak = allreduce.get("peak_busbw_gbps")
    best = max(rows, key=lambda row: row.get("busbw_gbps", 0.0), default=None)
    at = f" at {best.get('size') or best.get('bytes')}" if best else ""
    minimum = multi_node_busbw_min(expected_model, len(nodes), gpus_per_node, table)
    if minimum is None:
        figure = _fmt(peak) if isinstance(peak, (int, float)) else "?"
        verdict.checks.append(
            Check(
                "nccl.allreduce_nodes_busbw",
                Status.NOT_APPLICABLE,
                peak,
                None,
                f"peak bus bandwidth {figure} GB/s{at}: reported, not judged; no measured "
                f"minimum for {shape} {expected_model or '(no model)'} yet "
                "(infra/acceptance/thresholds.py MULTI_NODE_ALLREDUCE_BUSBW_GBPS_MIN)",
            )
        )
    else:
        verdict.checks.append(
            _at_least(
                "nccl.allreduce_nodes_busbw",
                peak,
                minimum,
                "GB/s",
                f"all-reduce peak bus bandwidth across {shape}",
                _FABRIC_HINT,
            )
        )
    return verdict


def _report_problem(report: Mapping[str, Any] | None) -> str | None:
    if report is None:
        return "no report came back"
    errors = report.get("errors") or []
    return "; ".join(str(error) for error in errors) or None


def _ecc_checks(burnin: Mapping[str, Any] | None, facts: NodeFacts | None) -> list[Check]:
    counts: dict[int, int] = {}
    if facts is not None and facts.ecc_uncorrected is not None:
        counts = dict(facts.ecc_uncorrected)
    elif burnin is not None:
        for gpu in burnin.get("gpus", []):
            value = gpu.get("ecc_uncorrected_volatile")
            if isinstance(value, int):
                counts[int(gpu.get("index", -1))] = value
    if not counts:
        return [Check("gpu.ecc", Status.NOT_APPLICABLE, None, 0, "ECC counts not collected")]
    bad = {index: count for index, count in sorted(counts.items()) if count > 0}
    if not bad:
        return [
            Check("gpu.ecc", Status.PASS, 0, 0, f"no uncorrected ECC errors on {len(counts)} GPUs")
        ]
    listing = ", ".join(f"GPU {index}: {count}" for index, count in bad.items())
    return [
        Check(
            "gpu.ecc",
            Status.FAIL,
            sum(bad.values()),
            0,
            f"uncorrected ECC errors ({listing}); check `nvidia-smi -q -d ECC,ROW_REMAPPER` "
            "and replace the GPU if rows cannot be remapped",
        )
    ]


def _xid_checks(facts: NodeFacts | None) -> list[Check]:
    if facts is None or facts.xid_codes is None:
        return [Check("node.xid", Status.NOT_APPLICABLE, None, 0, "kernel log not read")]
    codes = sorted(set(facts.xid_codes))
    hardware = [code for code in codes if code in HARDWARE_XIDS]
    if hardware:
        named = ", ".join(f"{code} ({HARDWARE_XIDS[code]})" for code in hardware)
        return [
            Check(
                "node.xid",
                Status.FAIL,
                ",".join(map(str, codes)),
                "none",
                f"hardware XIDs in the kernel log: {named}",
            )
        ]
    if codes:
        return [
            Check(
                "node.xid",
                Status.PASS,
                ",".join(map(str, codes)),
                "no hardware XIDs",
                f"only application-level XIDs ({', '.join(map(str, codes))}): "
                "not a hardware fault on their own",
            )
        ]
    return [Check("node.xid", Status.PASS, 0, "none", "no XIDs in the kernel log")]


def _port_up(port: IbPort) -> bool:
    state = port.state.lower()
    physical = (port.physical_state or "linkup").lower()
    return "active" in state and "linkup" in physical


def _ib_checks(facts: NodeFacts | None, expected: Sequence[ExpectedPort]) -> list[Check]:
    if facts is None or facts.ib_ports is None:
        if expected:
            return [
                Check(
                    "ib.ports",
                    Status.FAIL,
                    None,
                    len(expected),
                    f"the spec lists {len(expected)} RDMA ports but their state was not read; "
                    "run `ibstat` on the node",
                )
            ]
        return [Check("ib.ports", Status.NOT_APPLICABLE, None, None, "no RDMA ports to check")]
    found = {port.label: port for port in facts.ib_ports}
    wanted = list(expected) or [ExpectedPort(p.device, p.port) for p in facts.ib_ports]
    if not wanted:
        return [Check("ib.ports", Status.NOT_APPLICABLE, 0, None, "no RDMA ports on this node")]
    checks: list[Check] = []
    for want in wanted:
        name = f"ib.{want.label}"
        port = found.get(want.label)
        if port is None:
            checks.append(
                Check(
                    name,
                    Status.FAIL,
                    "missing",
                    "Active",
                    f"{want.label} not found: driver (OFED/DOCA) loaded? NIC seated? "
                    f"ports seen: {', '.join(sorted(found)) or 'none'}",
                )
            )
            continue
        state = f"{port.state}/{port.physical_state or '?'}"
        if not _port_up(port):
            checks.append(
                Check(
                    name,
                    Status.FAIL,
                    state,
                    "Active/LinkUp",
                    f"{want.label} is {state}: check the cable and optic, the switch port, "
                    "and (for InfiniBand) that a subnet manager runs",
                )
            )
            continue
        if (
            want.rate_gbps is not None
            and port.rate_gbps is not None
            and port.rate_gbps < want.rate_gbps
        ):
            checks.append(
                Check(
                    name,
                    Status.FAIL,
                    port.rate_gbps,
                    want.rate_gbps,
                    f"{want.label} is up at {port.rate_gbps:g} Gb/s, the spec says "
                    f"{want.rate_gbps:g}: a degraded link (optic, cable or lane width)",
                )
            )
            continue
        rate = f" at {port.rate_gbps:g} Gb/s" if port.rate_gbps is not None else ""
        checks.append(Check(name, Status.PASS, state, "Active/LinkUp", f"{want.label} up{rate}"))
    return checks


def evaluate(
    *,
    expected_model: str | None,
    expected_count: int,
    burnin: Mapping[str, Any] | None,
    facts: NodeFacts | None = None,
    expected_ports: Sequence[ExpectedPort] = (),
    thresholds: Mapping[str, GpuThresholds] = THRESHOLDS,
    node: str | None = None,
) -> Verdict:
    """All checks for one node. `expected_count` 0 means the spec lists no GPUs for it."""
    if expected_count < 0:
        raise ValueError(f"expected_count must be >= 0, got {expected_count}")
    verdict = Verdict(node=node)
    verdict.checks.extend(_gpu_checks(expected_model, expected_count, burnin, thresholds))
    if expected_count > 0 or facts is not None:
        verdict.checks.extend(_ecc_checks(burnin, facts))
    verdict.checks.extend(_xid_checks(facts))
    verdict.checks.extend(_ib_checks(facts, expected_ports))
    return verdict


def load_burnin(path: str | Path) -> dict[str, Any]:
    """Read a burnin.py report, with an error that says what is wrong and how to fix it."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(
            "burn-in report not found",
            [Problem("no such file", file=where, hint="run burnin.py --output FILE first")],
        ) from exc
    except json.JSONDecodeError as exc:
        raise UserError(
            "burn-in report is not JSON",
            [
                Problem(
                    exc.msg,
                    file=where,
                    line=exc.lineno,
                    column=exc.colno,
                    hint="use burnin.py --json (logs go to stderr) or --output FILE",
                )
            ],
        ) from exc
    if not isinstance(data, dict) or data.get("schema") != BURNIN_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise UserError(
            "not a burn-in report",
            [
                Problem(
                    f"schema is {found!r}, expected {BURNIN_SCHEMA!r}",
                    file=where,
                    path="schema",
                    hint="produce it with infra/acceptance/burnin.py of the same deepfleet",
                )
            ],
        )
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Judge a burn-in report against the spec.")
    parser.add_argument("report", help="burnin.py JSON report")
    parser.add_argument("--model", help="expected GPU model, e.g. H100")
    parser.add_argument("--count", type=int, required=True, help="expected GPUs (0: none)")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    args = parser.parse_args(argv)
    try:
        report = load_burnin(args.report)
    except UserError as error:
        print(error.render(), file=sys.stderr)
        return 2
    verdict = evaluate(
        expected_model=args.model,
        expected_count=args.count,
        burnin=report,
        node=report.get("host"),
    )
    print(json.dumps(verdict.to_dict(), indent=2) if args.json else verdict.render())
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
