"""GPU burn-in for one node: matmul rate, memory-copy bandwidth and NCCL all-reduce bandwidth.

Standalone on purpose: the deploy copies this one file into the SGLang engine container (which
has PyTorch and NCCL) and runs it there, so it imports nothing from deepfleet and nothing beyond
the standard library and torch. torch is imported inside the functions that need it, so the pure
helpers (bandwidth arithmetic, nvidia-smi parsing) import and test on a machine without torch.

    python3 burnin.py --json > burnin.json

What it measures, per GPU (all GPUs at once, one thread each; --sequential for one at a time):
- dense bf16 matrix product rate (TFLOP/s): an M x K by K x N product on random data, 2*M*N*K
  operations each; warm-up, then several timed samples with CUDA events; the median is reported.
  A small product is also checked against a float64 reference on the CPU (relative error).
- device-memory copy bandwidth (GB/s, 1e9 bytes/s): `dst.copy_(src)` of a large buffer; bytes
  counted are those read plus those written (2 x buffer size); median of the timed samples.

and across all GPUs of the node, when there are at least two:
- NCCL all-reduce (sum, bf16) over message sizes 1 MiB .. 1 GiB, one process per GPU started
  with torch.multiprocessing; algbw = bytes / time and busbw = algbw * 2(n-1)/n, as nccl-tests
  define them; the time is the mean of the timed iterations, the slowest rank's.

Across the nodes of a multi-node replica, the same sweep runs with one copy of this script per
node, all started at once (`deepfleet check --burnin` does that over SSH):

    python3 burnin.py --json --allreduce-only --ranks 8 --nnodes 2 --node-rank R \
        --master-addr 198.51.100.11 --master-port 29511

Global rank = node rank x ranks + local rank; rank 0 (on node rank 0) hosts the rendezvous at
the master address, and n in the busbw factor is every rank of every node.

It prints one JSON document (schema `deepfleet.burnin/1`) with --json, otherwise a short table.
Exit status: 0 when every measurement ran, 1 when one failed (the JSON says which), 2 on bad
arguments. Pass/fail against thresholds is not decided here: see infra/acceptance/verdict.py.

NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 and friends are forced in main().
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

SCHEMA = "deepfleet.burnin/1"

# NVLink multicast can put the GPUs of a shared host out of service; keep it off everywhere.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_ALLREDUCE_SIZES = (MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB)
NOT_APPLICABLE_ONE_GPU = "not applicable (1 GPU)"
RENDEZVOUS_TIMEOUT_S = 120.0
"""How long a rank waits for the others: long enough for every node's container to start."""

NVIDIA_SMI_FIELDS = (
    "index",
    "uuid",
    "driver_version",
    "ecc.errors.uncorrected.volatile.total",
    "temperature.gpu",
    "clocks.sm",
    "power.draw",
)


# --------------------------------------------------------------------------------------------
# Pure helpers (no torch)
# --------------------------------------------------------------------------------------------


def matmul_flops(m: int, n: int, k: int) -> int:
    """Floating-point operations of one m x k by k x n product (a multiply and an add each)."""
    return 2 * m * n * k


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def copy_bytes_moved(buffer_bytes: int) -> int:
    """Bytes a device-to-device copy moves through memory: each byte read once, written once."""
    return 2 * buffer_bytes


def gbps(nbytes: float, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second, as nccl-tests and datasheets count)."""
    return nbytes / seconds / 1e9


def allreduce_busbw_factor(ranks: int) -> float:
    """nccl-tests' bus-bandwidth factor for all-reduce: 2(n-1)/n."""
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    return 2.0 * (ranks - 1) / ranks


def allreduce_bandwidths(nbytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s for an all-reduce of `nbytes` per rank that took `seconds`."""
    algbw = gbps(nbytes, seconds)
    return algbw, algbw * allreduce_busbw_factor(ranks)


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def human_bytes(nbytes: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size} {unit}"
    return f"{nbytes} B"


def parse_size(text: str) -> int:
    """'1M', '64MiB', '1G', '4096' -> bytes (binary units)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    factors = {"K": 1 << 10, "M": MIB, "G": GIB}
    if raw and raw[-1] in factors:
        return int(float(raw[:-1]) * factors[raw[-1]])
    return int(raw)


def _smi_value(text: str) -> str | None:
    value = text.strip()
    if not value or value.startswith("[") or value in {"N/A", "Not Supported"}:
        return None
    return value


def parse_nvidia_smi_csv(output: str) -> list[dict[str, Any]]:
    """Parse `nvidia-smi --query-gpu=<NVIDIA_SMI_FIELDS> --format=csv,noheader,nounits`."""
    rows: list[dict[str, Any]] = []
    for line in output.splitlines():
        if not line.strip():
            continue
        cells = [_smi_value(cell) for cell in line.split(",")]
        if len(cells) != len(NVIDIA_SMI_FIELDS):
            continue
        index, uuid, driver, ecc, temp, sm_clock, power = cells
        rows.append(
            {
                "index": int(index) if index is not None else None,
                "uuid": uuid,
                "driver_version": driver,
                "ecc_uncorrected_volatile": int(ecc) if ecc is not None else None,
                "temperature_c": float(temp) if temp is not None else None,
                "sm_clock_mhz": float(sm_clock) if sm_clock is not None else None,
                "power_w": float(power) if power is not None else None,
            }
        )
    return rows


def _run_nvidia_smi(arguments: Sequence[str]) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, *arguments], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def query_nvidia_smi() -> list[dict[str, Any]]:
    """Per-GPU facts from nvidia-smi; an empty list where it is missing or fails."""
    output = _run_nvidia_smi(
        [f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    )
    return parse_nvidia_smi_csv(output) if output is not None else []


def parse_load_probe(output: str) -> dict[str, Any]:
    """Parse `nvidia-smi -i ID --query-gpu=<LOAD_FIELDS>` (csv, noheader, nounits)."""
    cells = [_smi_value(cell) for cell in output.strip().splitlines()[0].split(",")]
    names = ("sm_clock_mhz", "power_w", "power_limit_w", "temperature_c", "clock_event_reasons")
    probe: dict[str, Any] = {}
    for name, cell in zip(names, cells, strict=False):  # missing trailing fields stay unset
        if name == "clock_event_reasons":
            probe[name] = cell
        else:
            probe[name] = float(cell) if cell is not None else None
    return probe


def probe_under_load(gpu_id: str) -> dict[str, Any] | None:
    """Clocks, power and temperature of one GPU (index or UUID) right now, None if unknown."""
    base = "clocks.sm,power.draw,power.limit,temperature.gpu"
    for fields in (f"{base},clocks_event_reasons.active", base):  # older drivers lack the last
        output = _run_nvidia_smi(
            ["-i", gpu_id, f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
        )
        if output and output.strip():
            return parse_load_probe(output)
    return None


def uuid_key(uuid: str | None) -> str | None:
    """Compare GPU UUIDs from torch and nvidia-smi ('GPU-' prefix or not)."""
    if not uuid:
        return None
    return uuid.strip().lower().removeprefix("gpu-")


def _log(message: str) -> None:
    print(f"[burnin {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Measurements (torch imported lazily)
# --------------------------------------------------------------------------------------------


def _time_samples(
    run: Callable[[], None], *, warmup_s: float, samples: int, per_sample: int
) -> list[float]:
    """Seconds per call of `run`, one figure per sample of `per_sample` back-to-back calls."""
    import torch

    deadline = time.perf_counter() + warmup_s
    run()
    torch.cuda.synchronize()
    while time.perf_counter() < deadline:  # lets clocks ramp up and caches/handles settle
        for _ in range(per_sample):
            run()
        torch.cuda.synchronize()
    times: list[float] = []
    for _ in range(samples):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_sample):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per_sample)
    return times


def measure_matmul(
    device_index: int,
    size: int,
    *,
    warmup_s: float,
    samples: int,
    probe: Callable[[], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """bf16 size^3 product rate on one GPU, plus the relative error of a small product.

    With `probe`, about a second of products is queued after the timing and `probe()` (an
    nvidia-smi reading) runs while they execute: clocks and power under load.
    """
    import torch

    device = torch.device("cuda", device_index)
    gen = torch.Generator(device=device).manual_seed(1234 + device_index)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    out = torch.empty(size, size, device=device, dtype=torch.bfloat16)

    def run() -> None:
        torch.matmul(a, b, out=out)

    with torch.cuda.device(device):
        times = _time_samples(run, warmup_s=warmup_s, samples=samples, per_sample=10)
        under_load = None
        if probe is not None:
            for _ in range(min(1000, int(1.0 / median(times)) + 1)):
                run()
            under_load = probe()
            torch.cuda.synchronize()
    flops = matmul_flops(size, size, size)
    rates = [tflops(flops, t) for t in times]

    # Accuracy: a 1024^3 bf16 product on the GPU against float64 on the CPU, same inputs.
    small = 1024
    sa = torch.randn(small, small, device=device, dtype=torch.bfloat16, generator=gen)
    sb = torch.randn(small, small, device=device, dtype=torch.bfloat16, generator=gen)
    got = torch.matmul(sa, sb).double().cpu()
    ref = sa.double().cpu() @ sb.double().cpu()
    rel_error = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
    if rel_error != rel_error:  # NaN never passes; report it as infinite error
        rel_error = float("inf")
    return {
        "matmul_tflops": median(rates),
        "matmul_tflops_min_sample": min(rates),
        "matmul_tflops_max_sample": max(rates),
        "matmul_rel_error": rel_error,
        "under_load": under_load,
    }


def measure_copy(
    device_index: int, buffer_bytes: int, *, warmup_s: float, samples: int
) -> dict[str, Any]:
    """Device-to-device copy bandwidth on one GPU, counting bytes read plus bytes written."""
    import torch

    device = torch.device("cuda", device_index)
    src = torch.empty(buffer_bytes, device=device, dtype=torch.uint8).random_(0, 256)
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)

    with torch.cuda.device(device):
        times = _time_samples(run, warmup_s=warmup_s, samples=samples, per_sample=3)
    ok = bool(torch.equal(dst[:MIB], src[:MIB]) and torch.equal(dst[-MIB:], src[-MIB:]))
    moved = copy_bytes_moved(buffer_bytes)
    rates = [gbps(moved, t) for t in times]
    return {
        "copy_gbps": median(rates),
        "copy_gbps_min_sample": min(rates),
        "copy_gbps_max_sample": max(rates),
        "copy_correct": ok,
    }


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one all-reduce meet: this node's place among `nnodes` nodes.

    One node (the default) meets on loopback at a free port. Several nodes meet at node rank 0's
    address; every node must be given the same address, port, node count and ranks per node.
    """

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    """None: a free local port (one node only)."""
    timeout_s: float = RENDEZVOUS_TIMEOUT_S

    def problems(self) -> list[str]:
        found = []
        if self.nnodes < 1:
            found.append(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            found.append(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and self.master_port is None:
            found.append("--nnodes > 1 needs --master-port (the same on every node)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            found.append(f"--master-port must be 1..65535, got {self.master_port}")
        if self.timeout_s <= 0:
            found.append(f"--rendezvous-timeout-s must be positive, got {self.timeout_s:g}")
        return found


def _allreduce_worker(
    local_rank: int,
    local_ranks: int,
    rendezvous: Rendezvous,
    port: int,
    backend: str,
    sizes: Sequence[int],
    queue: Any,
) -> None:
    """One rank of the all-reduce sweep; each node's local rank 0 puts the table on `queue`.

    The table is the same on every rank (times are the slowest rank's, correctness the AND of
    all ranks, both reduced across the whole world), so any node's copy is rank 0's figures.
    """
    os.environ.update(NO_MULTICAST_ENV)
    import torch
    import torch.distributed as dist

    rank = rendezvous.node_rank * local_ranks + local_rank
    world = rendezvous.nnodes * local_ranks
    use_cuda = backend == "nccl"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{rendezvous.master_addr}:{port}",
        rank=rank,
        world_size=world,
        timeout=_dt.timedelta(seconds=rendezvous.timeout_s),
        **({"device_id": device} if use_cuda else {}),
    )
    try:
        rows: list[dict[str, Any]] = []
        dtype = torch.bfloat16 if use_cuda else torch.float32
        elem = torch.tensor([], dtype=dtype).element_size()
        for nbytes in sizes:
            count = nbytes // elem
            buf = torch.full((count,), float(rank + 1), dtype=dtype, device=device)
            # Correctness first: the sum of 1..world, exactly representable in bf16 for world<=8+.
            dist.all_reduce(buf)
            expected = world * (world + 1) / 2
            correct = bool(
                float(buf[0]) == expected
                and float(buf[-1]) == expected
                and float(buf[count // 2]) == expected
            )
            iters = max(3, min(50, (256 * MIB) // nbytes * 5)) if use_cuda else 3
            for _ in range(3):
                dist.all_reduce(buf)
            if use_cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            if use_cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            for _ in range(iters):
                dist.all_reduce(buf)
            if use_cuda:
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3 / iters
            else:
                seconds = (time.perf_counter() - t0) / iters
            slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            ok = torch.tensor([1 if correct else 0], dtype=torch.int32, device=device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            seconds = float(slowest.item())
            algbw, busbw = allreduce_bandwidths(nbytes, seconds, world)
            rows.append(
                {
                    "bytes": nbytes,
                    "size": human_bytes(nbytes),
                    "iterations": iters,
                    "time_us": seconds * 1e6,
                    "algbw_gbps": algbw,
                    "busbw_gbps": busbw,
                    "correct": bool(ok.item()),
                }
            )
            del buf
        if local_rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_allreduce(
    ranks: int,
    sizes: Sequence[int],
    *,
    backend: str = "nccl",
    timeout_s: float = 240.0,
    rendezvous: Rendezvous | None = None,
) -> dict[str, Any]:
    """All-reduce sweep across `ranks` processes on this node (one per GPU for nccl), times
    `rendezvous.nnodes` nodes when several nodes take part."""
    meet = rendezvous or Rendezvous()
    world = ranks * meet.nnodes
    method = {
        "backend": backend,
        "op": "sum",
        "dtype": "bfloat16" if backend == "nccl" else "float32",
        "busbw": "algbw * 2(n-1)/n (nccl-tests), n = every rank of every node",
        "time": "mean of timed iterations, slowest rank",
        "nvls": "disabled (NCCL_NVLS_ENABLE=0)",
    }
    shape: dict[str, Any] = {"ranks": world}
    if meet.nnodes > 1:
        shape.update(
            nodes=meet.nnodes,
            ranks_per_node=ranks,
            node_rank=meet.node_rank,
            master=f"{meet.master_addr}:{meet.master_port}",
        )
    if world < 2:
        return {
            "status": "not-applicable",
            "reason": NOT_APPLICABLE_ONE_GPU if ranks == 1 else "not applicable (no GPU)",
            **shape,
            "method": method,
            "results": [],
        }
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = meet.master_port if meet.master_port is not None else _free_port()
    procs = mp.start_processes(
        _allreduce_worker,
        args=(ranks, meet, port, backend, list(sizes), queue),
        nprocs=ranks,
        join=False,
        start_method="spawn",
    )
    # Several nodes: the sweep may start only once the last node's ranks joined.
    limit = timeout_s + (meet.timeout_s if meet.nnodes > 1 else 0)
    deadline = time.monotonic() + limit
    error: str | None = None
    try:
        while not procs.join(timeout=1.0):
            if time.monotonic() > deadline:
                error = f"timed out after {limit:.0f} s (hung NCCL, or a node that never joined?)"
                break
    except Exception as exc:  # a rank raised: ProcessRaisedException carries its traceback
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
    if error is not None:
        for proc in procs.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in procs.processes:
            proc.join(timeout=10)
        return {
            "status": "failed",
            "reason": error,
            **shape,
            "method": method,
            "results": [],
        }
    if queue.empty():
        return {
            "status": "failed",
            "reason": "local rank 0 returned no results",
            **shape,
            "method": method,
            "results": [],
        }
    rows: list[dict[str, Any]] = queue.get()
    status = "ok" if all(row["correct"] for row in rows) else "failed"
    result: dict[str, Any] = {"status": status, **shape, "method": method, "results": rows}
    if status != "ok":
        result["reason"] = "all-reduce returned a wrong sum"
    if rows:
        result["peak_busbw_gbps"] = max(row["busbw_gbps"] for row in rows)
        result["largest_message_busbw_gbps"] = rows[-1]["busbw_gbps"]
    return result


def collect_versions() -> dict[str, Any]:
    import torch

    nccl: str | None = None
    with contextlib.suppress(Exception):
        raw = torch.cuda.nccl.version()
        nccl = ".".join(str(part) for part in raw) if isinstance(raw, tuple) else str(raw)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "driver": None,  # filled from nvidia-smi where it answers
        "kernel": platform.release(),
    }


def measure_gpu(
    index: int, facts: dict[str, Any] | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Matmul and copy figures of one GPU; an exception becomes the entry's "error"."""
    import torch

    props = torch.cuda.get_device_properties(index)
    torch_uuid = str(getattr(props, "uuid", "")) or None
    smi_id = (facts or {}).get("uuid") or (str(index) if facts else None)
    gpu: dict[str, Any] = {
        "index": index,
        "name": props.name,
        "uuid": (facts or {}).get("uuid") or torch_uuid,
        "memory_total_bytes": int(props.total_memory),
        "sm_count": int(props.multi_processor_count),
        "compute_capability": f"{props.major}.{props.minor}",
    }
    try:
        with torch.cuda.device(index):
            gpu.update(
                measure_matmul(
                    index,
                    args.matmul_size,
                    warmup_s=args.warmup_s,
                    samples=args.samples,
                    probe=functools.partial(probe_under_load, smi_id) if smi_id else None,
                )
            )
            gpu.update(
                measure_copy(index, args.copy_bytes, warmup_s=args.warmup_s, samples=args.samples)
            )
            torch.cuda.empty_cache()
    except Exception as exc:  # a broken GPU must not hide the figures of the others
        gpu["error"] = f"{type(exc).__name__}: {exc}"
    if facts is not None:
        gpu["ecc_uncorrected_volatile"] = facts["ecc_uncorrected_volatile"]
        gpu["idle"] = {
            "sm_clock_mhz": facts["sm_clock_mhz"],
            "power_w": facts["power_w"],
            "temperature_c": facts["temperature_c"],
        }
    _log(
        f"GPU {index}: {gpu.get('matmul_tflops', float('nan')):.0f} TFLOP/s, "
        f"{gpu.get('copy_gbps', float('nan')):.0f} GB/s"
    )
    return gpu


def run_burnin(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    started = time.monotonic()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "versions": collect_versions(),
        "method": {
            "matmul": {
                "shape": [args.matmul_size] * 3,
                "dtype": "bfloat16",
                "data": "random normal",
                "flops_per_product": matmul_flops(*[args.matmul_size] * 3),
                "samples": args.samples,
                "statistic": "median",
                "accuracy_check": "1024^3 bf16 product vs float64 on CPU, relative Frobenius",
            },
            "copy": {
                "buffer_bytes": args.copy_bytes,
                "bytes_counted": "read + write (2 x buffer)",
                "unit": "GB/s = 1e9 bytes/s",
                "samples": args.samples,
                "statistic": "median",
            },
        },
        "errors": [],
    }
    cuda = torch.cuda.is_available()
    if not cuda and args.backend == "nccl":
        report.update(gpu_name=None, gpu_count=0, gpus=[])
        report["allreduce"] = measure_allreduce(0, [])
        report["errors"].append("CUDA is not available to torch: no GPU, driver or runtime")
        report["duration_s"] = round(time.monotonic() - started, 2)
        return report

    count = torch.cuda.device_count() if cuda else 0
    if args.allreduce_only or not cuda:
        # --allreduce-only: the nodes' GPUs were measured by their own burn-in; gloo without
        # CUDA: a plumbing test of the all-reduce on CPU tensors.
        report["method"]["gpus"] = "not measured (--allreduce-only)" if cuda else "no CUDA"
        report["method"].pop("matmul")
        report["method"].pop("copy")
        gpus: list[dict[str, Any]] = []
        names = sorted({torch.cuda.get_device_name(index) for index in range(count)})
    else:
        gpus = _measure_gpus(count, args, report)
        names = sorted({gpu["name"] for gpu in gpus})
    for gpu in gpus:
        if "error" in gpu:
            report["errors"].append(f"GPU {gpu['index']}: {gpu['error']}")
    report["gpu_name"] = (names[0] if len(names) == 1 else " / ".join(names)) if names else None
    report["gpu_count"] = count
    report["gpus"] = gpus

    ranks = args.ranks if args.ranks is not None else count
    if args.skip_allreduce:
        report["allreduce"] = {"status": "skipped", "reason": "--skip-allreduce", "ranks": ranks}
    else:
        meet = rendezvous_of(args)
        where = f" x {meet.nnodes} nodes (this is node {meet.node_rank})" if meet.nnodes > 1 else ""
        _log(f"all-reduce over {ranks} rank(s){where}, backend {args.backend} ...")
        report["allreduce"] = measure_allreduce(
            ranks, args.sizes, backend=args.backend, rendezvous=meet
        )
        if report["allreduce"]["status"] == "failed":
            report["errors"].append(f"all-reduce: {report['allreduce']['reason']}")
    report["duration_s"] = round(time.monotonic() - started, 2)
    return report


def _measure_gpus(
    count: int, args: argparse.Namespace, report: dict[str, Any]
) -> list[dict[str, Any]]:
    """Matmul and copy figures of every GPU, with nvidia-smi's idle facts beside them."""
    import torch

    smi_rows = query_nvidia_smi()
    smi_by_uuid = {uuid_key(row["uuid"]): row for row in smi_rows if row["uuid"]}
    smi_by_index = {row["index"]: row for row in smi_rows}
    if smi_rows:
        report["versions"]["driver"] = smi_rows[0]["driver_version"]
    facts_of: dict[int, dict[str, Any] | None] = {}
    for index in range(count):
        torch_uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "")) or None
        facts_of[index] = smi_by_uuid.get(uuid_key(torch_uuid)) or (
            smi_by_index.get(index) if torch_uuid is None else None
        )
    mode = "sequential" if args.sequential else "parallel"
    report["method"]["gpus"] = (
        "one after another" if args.sequential else "all at once, one thread per GPU"
    )
    _log(f"{count} GPU(s), {mode}: matmul {args.matmul_size}^3 bf16, then copy ...")
    if args.sequential:
        return [measure_gpu(index, facts_of[index], args) for index in range(count)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, count)) as pool:
        futures = [pool.submit(measure_gpu, index, facts_of[index], args) for index in range(count)]
        return [future.result() for future in futures]


def rendezvous_of(args: argparse.Namespace) -> Rendezvous:
    return Rendezvous(
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        timeout_s=args.rendezvous_timeout_s,
    )


def render_text(report: dict[str, Any]) -> str:
    lines = [
        f"{report.get('gpu_count', 0)} x {report.get('gpu_name')}  "
        f"torch {report['versions'].get('torch')}  CUDA {report['versions'].get('cuda')}  "
        f"driver {report['versions'].get('driver')}  NCCL {report['versions'].get('nccl')}",
        f"{'GPU':>3}  {'bf16 TFLOP/s':>12}  {'copy GB/s':>9}  {'rel.err':>8}  under load",
    ]
    for gpu in report.get("gpus", []):
        if "error" in gpu:
            lines.append(f"{gpu['index']:>3}  error: {gpu['error']}")
            continue
        load = gpu.get("under_load") or {}
        lines.append(
            f"{gpu['index']:>3}  {gpu['matmul_tflops']:>12.1f}  {gpu['copy_gbps']:>9.1f}  "
            f"{gpu['matmul_rel_error']:>8.1e}  {load.get('sm_clock_mhz')} MHz "
            f"{load.get('power_w')}/{load.get('power_limit_w')} W "
            f"{load.get('temperature_c')} C {load.get('clock_event_reasons')}"
        )
    allreduce = report.get("allreduce", {})
    if allreduce.get("results"):
        nodes = f" on {allreduce['nodes']} nodes" if allreduce.get("nodes") else ""
        lines.append(f"all-reduce, {allreduce['ranks']} ranks{nodes}:")
        lines.append(f"{'size':>8}  {'time us':>9}  {'algbw GB/s':>10}  {'busbw GB/s':>10}  ok")
        for row in allreduce["results"]:
            lines.append(
                f"{row['size']:>8}  {row['time_us']:>9.1f}  {row['algbw_gbps']:>10.1f}  "
                f"{row['busbw_gbps']:>10.1f}  {'yes' if row['correct'] else 'NO'}"
            )
    else:
        lines.append(f"all-reduce: {allreduce.get('status')} {allreduce.get('reason', '')}".strip())
    for error in report.get("errors", []):
        lines.append(f"error: {error}")
    lines.append(f"took {report.get('duration_s')} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="GPU burn-in for one node: bf16 matmul, memory copy, NCCL all-reduce."
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    parser.add_argument("--output", help="also write the JSON report to this file")
    parser.add_argument("--matmul-size", type=int, default=8192, help="M=N=K (default 8192)")
    parser.add_argument(
        "--copy-size", type=parse_size, default=2 * GIB, dest="copy_bytes",
        help="copy buffer size, e.g. 2G (default 2 GiB; 2x counted)",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=20, help="timed samples (default 20)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="warm-up seconds per test")
    parser.add_argument(
        "--sizes", type=lambda text: [parse_size(part) for part in text.split(",")],
        default=list(DEFAULT_ALLREDUCE_SIZES), help="all-reduce message sizes, e.g. 1M,64M,1G",
    )  # fmt: skip
    parser.add_argument(
        "--sequential", action="store_true",
        help="measure GPUs one after another (default: all at once, as when serving)",
    )  # fmt: skip
    parser.add_argument("--skip-allreduce", action="store_true")
    parser.add_argument(
        "--backend", choices=("nccl", "gloo"), default="nccl",
        help="all-reduce backend; gloo (CPU) only exercises the plumbing",
    )  # fmt: skip
    parser.add_argument(
        "--ranks", type=int, default=None,
        help="all-reduce ranks on this node (default: one per GPU)",
    )  # fmt: skip
    parser.add_argument(
        "--allreduce-only", action="store_true",
        help="skip the matmul and copy (the all-reduce across nodes, after each node's burn-in)",
    )  # fmt: skip
    across = parser.add_argument_group(
        "all-reduce across nodes", "start one copy per node, at once, with the same values"
    )
    across.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    across.add_argument("--node-rank", type=int, default=0, help="this node's place, from 0")
    across.add_argument(
        "--master-addr", default="127.0.0.1",
        help="node rank 0's address, reachable from every node (default 127.0.0.1)",
    )  # fmt: skip
    across.add_argument(
        "--master-port", type=int, default=None,
        help="a free TCP port on node rank 0 (default: a free local port; one node only)",
    )  # fmt: skip
    across.add_argument(
        "--rendezvous-timeout-s", type=float, default=RENDEZVOUS_TIMEOUT_S,
        help=f"how long ranks wait for each other (default {RENDEZVOUS_TIMEOUT_S:.0f})",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.update(NO_MULTICAST_ENV)
    args = build_parser().parse_args(argv)
    problems = rendezvous_of(args).problems()
    if args.ranks is not None and args.ranks < 1:
        problems.append(f"--ranks must be at least 1, got {args.ranks}")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.backend == "nccl" and args.ranks is not None and args.ranks > 1:
        import torch

        if args.ranks > torch.cuda.device_count():
            print(
                f"error: --ranks {args.ranks} needs {args.ranks} GPUs with nccl, "
                f"found {torch.cuda.device_count()}; use --backend gloo to test plumbing",
                file=sys.stderr,
            )
            return 2
    report = run_burnin(args)
    text = json.dumps(report, indent=2, sort_keys=False)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text if args.json else render_text(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
