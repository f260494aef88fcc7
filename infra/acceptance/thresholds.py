"""Minimum burn-in figures per GPU model, derived from measurements, never from datasheets.

Each model's minimums are MARGIN x what `burnin.py` measured on a healthy GPU of that model (the
median of three runs; docs/acceptance.md holds the table, date, command and versions). With
MARGIN = 0.75 a GPU at half its measured rate fails clearly, while the run-to-run spread seen
(about 6% on the matrix product, under 2% on the copy) stays far inside the margin.

Keys are the canonical names of the GPU catalog (`infra/gpus.py`: "H100", "H200", ...). A model
without an entry gets "not-applicable" performance checks, with a message saying how to add one:
run the burn-in on a healthy node and add its figures here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

MARGIN = 0.75
"""Minimum = MARGIN x measured: half speed fails, normal run-to-run spread passes."""

MAX_MATMUL_REL_ERROR = 1e-2
"""bf16 operands land between 1e-3 and 1e-2 against a float64 reference; measured 1.7e-3."""


@dataclass(frozen=True)
class Reference:
    """What burnin.py measured on a healthy GPU; the minimums are derived from it."""

    matmul_tflops: float
    copy_gbps: float
    allreduce_busbw_gbps: float | None
    """Peak all-reduce bus bandwidth across the node's GPUs; None where not measured yet."""
    allreduce_ranks: int | None
    runs: int
    date: str
    device: str
    command: str
    versions: str


@dataclass(frozen=True)
class GpuThresholds:
    model: str
    matmul_tflops_min: float
    copy_gbps_min: float
    allreduce_busbw_gbps_min: float | None
    """None: no multi-GPU measurement yet, so the bus-bandwidth check is not-applicable."""
    reference: Reference

    @classmethod
    def from_reference(
        cls, model: str, reference: Reference, margin: float = MARGIN
    ) -> GpuThresholds:
        busbw = reference.allreduce_busbw_gbps
        return cls(
            model=model,
            matmul_tflops_min=math.floor(reference.matmul_tflops * margin),
            copy_gbps_min=math.floor(reference.copy_gbps * margin),
            allreduce_busbw_gbps_min=math.floor(busbw * margin) if busbw is not None else None,
            reference=reference,
        )


_COMMAND = "python3 infra/acceptance/burnin.py --output $OUT/<gpu>-run<i>.json (3 runs)"
_VERSIONS = "torch 2.11.0+cu130, CUDA 13.0, NCCL 2.28.9, driver 580.159.04"

REFERENCES: Mapping[str, Reference] = MappingProxyType(
    {
        # Runs: matmul 645.7 / 675.9 / 683.6 TFLOP/s, copy 3014.9 / 2995.0 / 3001.8 GB/s;
        # power-capped at 700 W under load (SM 1425-1440 MHz, clock-event reason 0x4).
        "H100": Reference(
            matmul_tflops=675.9,
            copy_gbps=3001.8,
            allreduce_busbw_gbps=None,
            allreduce_ranks=None,
            runs=3,
            date="2026-11-23",
            device="1x NVIDIA H100 80GB HBM3 (SXM), 700 W limit, Firecracker VM",
            command=_COMMAND,
            versions=_VERSIONS,
        ),
        # Runs: matmul 671.7 / 669.2 / 669.3 TFLOP/s, copy 4199.9 / 4238.7 / 4236.5 GB/s;
        # power-capped at 700 W under load (SM 1500-1530 MHz, clock-event reason 0x4).
        "H200": Reference(
            matmul_tflops=669.3,
            copy_gbps=4236.5,
            allreduce_busbw_gbps=None,
            allreduce_ranks=None,
            runs=3,
            date="2026-11-23",
            device="1x NVIDIA H200 141GB HBM3e (SXM), 700 W limit, Firecracker VM",
            command=_COMMAND,
            versions=_VERSIONS,
        ),
    }
)

THRESHOLDS: Mapping[str, GpuThresholds] = MappingProxyType(
    {model: GpuThresholds.from_reference(model, ref) for model, ref in REFERENCES.items()}
)


MULTI_NODE_ALLREDUCE_BUSBW_GBPS_MIN: Mapping[tuple[str, int, int], float] = MappingProxyType({})
"""Minimum peak all-reduce bus bandwidth across the nodes of a replica, keyed by (GPU model,
nodes, GPUs per node). Empty: no multi-node all-reduce has run on real hardware yet (issue 10;
only single-GPU machines were lent), so `deepfleet check --burnin` reports the figure and does
not judge it. Add MARGIN x the median of three runs on a healthy replica of that shape; the
figure depends on the RDMA fabric (ports, rate, switch) as much as on the GPUs."""


def multi_node_busbw_min(
    model: str | None,
    nodes: int,
    gpus_per_node: int,
    table: Mapping[tuple[str, int, int], float] = MULTI_NODE_ALLREDUCE_BUSBW_GBPS_MIN,
) -> float | None:
    """The measured minimum for this replica shape, or None where none was measured."""
    if model is None:
        return None
    wanted = model_key(model)
    for (key, key_nodes, key_gpus), minimum in table.items():
        if model_key(key) == wanted and (key_nodes, key_gpus) == (nodes, gpus_per_node):
            return minimum
    return None


# Device names as CUDA / nvidia-smi report them -> catalog names. Order matters: "H200" before
# "H20", PCIe/NVL boards (lower clocks and power) before the SXM board of the same chip.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bH100\b.*\b(PCIE|NVL)\b", "H100-{1}"),
    (r"\bH100\b", "H100"),
    (r"\bH800\b", "H800"),
    (r"\bH200\b.*\bNVL\b", "H200-NVL"),
    (r"\bH200\b", "H200"),
    (r"\bH20\b", "H20-{mem}"),
    (r"\bB200\b", "B200"),
    (r"\bA100\b", "A100-{mem}"),
    (r"\bL40S\b", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bA10\b", "A10"),
    (r"\bRTX 4090\b", "RTX4090"),
)


def _memory_tag(memory_bytes: int | None, sizes_gb: tuple[int, ...]) -> str:
    """The catalog's memory suffix ("80G") nearest to the reported total memory."""
    if memory_bytes is None:
        return "?"
    gb = memory_bytes / 1e9
    return f"{min(sizes_gb, key=lambda size: abs(size - gb))}G"


def gpu_model_from_name(name: str, memory_bytes: int | None = None) -> str | None:
    """Catalog name for a device name such as "NVIDIA H100 80GB HBM3" ("H100"), else None.

    Boards whose names don't say their memory (A100, H20) need `memory_bytes` to be told apart.
    """
    text = name.upper()
    for pattern, model in _NAME_PATTERNS:
        match = re.search(pattern, text)
        if match is None:
            continue
        if "{1}" in model:
            return model.replace("{1}", match.group(1))
        if "{mem}" in model:
            sizes = (40, 80) if model.startswith("A100") else (96, 141)
            tag = re.search(r"(\d+)\s*GB", text)
            memory = int(tag.group(1)) * 10**9 if tag else memory_bytes
            return model.replace("{mem}", _memory_tag(memory, sizes))
        return model
    return None


def model_key(name: str) -> str:
    """Compare model names loosely: case, spaces, dashes and a leading "NVIDIA" don't matter."""
    text = re.sub(r"^nvidia[\s_-]*", "", name.strip().lower())
    return re.sub(r"[\s_-]+", "", text)


def thresholds_for(
    model: str, table: Mapping[str, GpuThresholds] = THRESHOLDS
) -> GpuThresholds | None:
    wanted = model_key(model)
    for key, thresholds in table.items():
        if model_key(key) == wanted:
            return thresholds
    return None
