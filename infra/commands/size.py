"""`deepfleet size`: what hardware a model needs, and the SGLang flags that serve it.

Exit codes: 0 it fits, 1 it does not, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from infra.errors import Problem, UserError
from infra.gpus import GpuModel, custom_gpu, find_gpu, resolve_gpu
from infra.models import resolve_model
from infra.sizing import DEFAULT_CONCURRENCY, DEFAULT_CONTEXT, SizingReport, size_model

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "size",
        help="memory a model needs and the engine layout that serves it",
        description=(
            "Size a model for a GPU type: weights + KV cache + runtime overhead, the tensor/"
            "data-parallel layout, nodes and mem_fraction_static. Exit 0 fits, 1 does not, "
            "2 bad input."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        help="HF id, alias (r1, qwen-7b, ...) or a directory with config.json",
    )
    parser.add_argument(
        "--gpu",
        help="GPU model, e.g. H200, H100, H20, A100-80G, L40S, 4090 (another name with --gpu-memory)",
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="usable memory per GPU in decimal GB; overrides the catalog (MIG, vGPU, unlisted card)",
    )
    parser.add_argument("--gpus-per-node", type=int, required=True, metavar="N")
    parser.add_argument(
        "--nodes", type=int, metavar="M", help="nodes available; omitted: the fewest that fit"
    )
    parser.add_argument(
        "--dtype", help="weight dtype: bf16, fp16, fp8, int8, int4 (default: as published)"
    )
    parser.add_argument("--kv-dtype", default="bf16", help="KV cache dtype: bf16 or fp8_e4m3")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="TOKENS")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="C",
        help="requests held at full context at once, per replica",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _gpu(name: str | None, memory_gb: float | None) -> GpuModel:
    if memory_gb is not None and memory_gb <= 0:
        raise UserError(
            "GPU memory must be positive",
            [Problem(f"--gpu-memory {memory_gb:g}", hint="give decimal GB, e.g. 80")],
        )
    if name is None:
        if memory_gb is None:
            raise UserError(
                "no GPU given",
                [Problem("size needs a GPU", hint="add --gpu H200 (or --gpu-memory GB)")],
            )
        return custom_gpu(memory_gb)
    gpu = find_gpu(name)
    if gpu is None:
        if memory_gb is None:
            return resolve_gpu(name)  # raises: unknown, with the nearest names
        # A card the catalog lacks (MI300X, A800...): --gpu-memory is all sizing needs, and the
        # report's note says that nothing else about the card is known.
        return custom_gpu(memory_gb, name=name)
    return gpu if memory_gb is None else gpu.with_memory_gb(memory_gb)


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    gpu = _gpu(args.gpu, args.gpu_memory)
    report = size_model(
        model,
        gpu,
        gpus_per_node=args.gpus_per_node,
        nodes=args.nodes,
        dtype=args.dtype,
        kv_dtype=args.kv_dtype,
        context=args.context,
        concurrency=args.concurrency,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_human(report, model.active_params)
    return EXIT_FITS if report.fits else EXIT_DOES_NOT_FIT


def _billions(params: int) -> str:
    return f"{params / 1e9:.3g}B"


def _print_human(report: SizingReport, active_params: int | None) -> None:
    console = Console(file=sys.stdout, highlight=False)
    rec = report.recommended
    params = _billions(report.model_params)
    if active_params and active_params != report.model_params:
        params += f", {_billions(active_params)} active"
    verdict = "[bold green]fits[/]" if report.fits else "[bold red]does not fit[/]"
    gpus = f"{rec.tp} GPU" if rec.tp == 1 else f"{rec.tp} GPUs"
    nodes = f"{rec.nodes} node" if rec.nodes == 1 else f"{rec.nodes} nodes"
    capacity = (
        "n/a (embedding model, no KV cache)"
        if report.kv_bytes_per_token == 0 and report.fits
        else f"{report.kv_cache_tokens:,} tokens per replica"
    )

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    rows = [
        ("model", f"{report.model} ({params})"),
        ("precision", f"{report.dtype} weights, {report.kv_dtype} KV cache"),
        ("gpu", f"{report.gpu}, {report.gpu_memory_gb:.1f} GB each, {report.gpus_per_node}/node"),
        ("verdict", verdict),
        (
            "required",
            f"{report.required_gb:.1f} GB per replica "
            f"({report.per_gpu_required_gb:.1f} GB x {gpus})",
        ),
        ("  weights", f"{report.weights_gb:.1f} GB"),
        (
            "  kv cache",
            f"{report.kv_cache_gb:.1f} GB for {report.context:,} tokens x {report.concurrency}",
        ),
        ("  overhead", f"{report.overhead_gb:.1f} GB"),
        ("available", f"{report.available_gb:.1f} GB per replica"),
        ("kv capacity", capacity),
        (
            "layout",
            f"tp {rec.tp}, dp {rec.dp}, {nodes}, mem_fraction_static {rec.mem_fraction_static:.2f}",
        ),
    ]
    # Flags for a layout that does not fit would only be copied into a failing launch.
    if report.fits:
        rows.append(("sglang", " ".join(report.engine_args())))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    for reason in report.reasons:
        console.print(f"{'ok' if report.fits else 'why'}: {reason}", soft_wrap=True)
    for warning in report.warnings:
        console.print(f"[yellow]note[/]: {warning}", soft_wrap=True)
