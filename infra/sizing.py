"""How much GPU memory a model needs, and the SGLang layout that serves it.

Per GPU of one replica (a tensor-parallel group of ``tp`` GPUs):

    need = weights / tp (+ replicated pieces) + KV cache for context x concurrency + overhead
    overhead = RUNTIME_GB_PER_GPU + MOE_RUNTIME_FRACTION x weights on that GPU (MoE only)

SGLang's ``--mem-fraction-static`` is the share of each GPU given to weights plus the KV pool;
the rest is left for the overhead, so we recommend ``1 - overhead / gpu memory`` (rounded down
to 0.01) and report how many tokens the KV pool then holds. All sizes are decimal GB (10**9
bytes); GPU capacities are nvidia-smi's totals converted to GB (see infra/gpus.py).

The constants are calibrated against the field tables in the deployment recipes (see
docs/sizing.md and tests/test_sizing.py, which assert every row).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

from infra.errors import Problem, UserError
from infra.gpus import GB, GpuModel, resolve_gpu
from infra.models import WEIGHT_DTYPES, ModelArch, WeightDtype, resolve_model

KvDtype = Literal["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"]
KV_DTYPES: tuple[KvDtype, ...] = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2")

BYTES_PER_PARAM: dict[WeightDtype, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}
KV_BYTES: dict[KvDtype, int] = {"bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}

# Quantization scales stored next to the weights, bytes per quantized parameter.
# FP8 (DeepSeek's format): one fp32 scale per 128x128 block.
FP8_SCALE_BYTES = 4 / (128 * 128)
# INT4 (AWQ/GPTQ/W4A8): one fp16 scale and one 4-bit zero point per group of 128 weights.
INT4_SCALE_BYTES = 2.5 / 128

# Memory outside mem_fraction_static on every GPU: CUDA context and cuBLAS/NCCL workspaces
# (~1.5 GB), CUDA graphs for the decode batch sizes (~1-2 GB), activations of one chunked-prefill
# step (~1 GB). 4.5 GB is the value that reproduces the field table: the 7B distill needs
# >= 20 GB yet fits one 24 GB A10 (24.15 GB), the 70B fits one 141 GB card.
RUNTIME_GB_PER_GPU = 4.5
# MoE models need more headroom in proportion to the weights they hold: fused-MoE and DeepGEMM
# workspaces, token dispatch buffers for 256 experts and CUDA graphs over 61 MLA+MoE layers.
# 15% reproduces the recipes' ">= 800 GB for FP8 R1" (1.2x rule of thumb) and keeps
# mem_fraction_static for R1 in the 0.8-0.9 band of SGLang's own defaults. A single rule for
# dense and MoE cannot hold: the 70B on one 141 GB card leaves < 7 GB of headroom.
MOE_RUNTIME_FRACTION = 0.15
# Search limit when the user leaves the node count to us (BF16 R1 on H100 needs 4).
MAX_NODES = 16

DEFAULT_CONTEXT = 8192
DEFAULT_CONCURRENCY = 1
_QUANTIZED: frozenset[WeightDtype] = frozenset({"fp8", "int8", "int4"})


@dataclass(frozen=True)
class Recommendation:
    """The engine layout: tp GPUs per replica spread over nodes_per_replica nodes, dp replicas."""

    tp: int
    dp: int
    nodes: int
    nodes_per_replica: int
    mem_fraction_static: float


@dataclass(frozen=True)
class SizingReport:
    """The answer to "does this model fit, and how do I launch it"; figures per replica."""

    model: str
    model_params: int
    model_dtype: str
    """The dtype the model is published in."""
    gpu: str
    gpu_memory_gb: float
    gpus_per_node: int
    dtype: str
    kv_dtype: str
    context: int
    concurrency: int
    fits: bool
    required_gb: float
    """weights_gb + kv_cache_gb + overhead_gb: what one replica needs for context x concurrency."""
    available_gb: float
    """Memory of the tp GPUs of one replica."""
    weights_gb: float
    """Over all GPUs of the replica, replicated pieces counted on each."""
    kv_cache_gb: float
    """KV cache for context x concurrency tokens, counting per-rank copies (MLA, GQA tp > heads)."""
    overhead_gb: float
    per_gpu_required_gb: float
    kv_cache_tokens: int
    """Tokens the KV pool holds at the recommended mem_fraction_static (SGLang's max_total_num_tokens)."""
    kv_bytes_per_token: int
    """KV bytes one GPU stores per token, all layers."""
    recommended: Recommendation
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """One sentence for people: why it fits, or the first reason it does not."""
        return self.reasons[0] if self.reasons else ""

    def engine_args(self) -> list[str]:
        """sglang.launch_server flags for one replica (add --dist-init-addr/--node-rank per node)."""
        rec = self.recommended
        args = ["--tp-size", str(rec.tp)]
        replicas_per_node = self.gpus_per_node // rec.tp if rec.nodes_per_replica == 1 else 1
        if replicas_per_node > 1:
            args += ["--dp-size", str(replicas_per_node)]
        if rec.nodes_per_replica > 1:
            args += ["--nnodes", str(rec.nodes_per_replica)]
        args += ["--mem-fraction-static", f"{rec.mem_fraction_static:.2f}"]
        args += ["--context-length", str(self.context)]
        if self.kv_dtype.startswith("fp8"):
            args += ["--kv-cache-dtype", self.kv_dtype]
        if self.dtype == "fp8" and self.model_dtype in ("bf16", "fp16"):
            args += ["--quantization", "fp8"]
        return args

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = round(value, 2)
        data["reasons"] = list(self.reasons)
        data["warnings"] = list(self.warnings)
        data["reason"] = self.reason
        data["engine_args"] = self.engine_args()
        return data


def weights_gb(model: ModelArch, dtype: WeightDtype) -> float:
    """Weights of the whole model in GPU memory, with quantization scales."""
    return _weight_bytes(model, dtype, model.params) / GB


def _bytes_per_quantized_param(model: ModelArch, dtype: WeightDtype) -> float:
    if dtype == "fp8":
        return 1.0 + FP8_SCALE_BYTES
    if dtype == "int8":
        # W8A8 keeps one fp32 scale per output channel, i.e. per row of hidden_size weights.
        return 1.0 + 4 / model.hidden_size
    if dtype == "int4":
        return 0.5 + INT4_SCALE_BYTES
    # Engines serve fp32 checkpoints in 16 bits; see infra/models.py.
    return 2.0 if dtype == "fp32" else BYTES_PER_PARAM[dtype]


def _weight_bytes(model: ModelArch, dtype: WeightDtype, params: int) -> float:
    per_param = _bytes_per_quantized_param(model, dtype)
    if dtype not in _QUANTIZED:
        return params * per_param
    # Quantized checkpoints keep the embeddings and LM head in 16 bits.
    embeddings = min(params, model.embedding_params)
    return embeddings * 2.0 + (params - embeddings) * per_param


def _weights_per_gpu_gb(model: ModelArch, dtype: WeightDtype, tp: int) -> float:
    total = _weight_bytes(model, dtype, model.params)
    replicated = model.replicated_params * _bytes_per_quantized_param(model, dtype)
    return (replicated + (total - replicated) / tp) / GB


def overhead_per_gpu_gb(model: ModelArch, weights_on_gpu_gb: float) -> float:
    moe = MOE_RUNTIME_FRACTION * weights_on_gpu_gb if model.is_moe else 0.0
    return RUNTIME_GB_PER_GPU + moe


def layout_problems(
    model: ModelArch, gpus_per_node: int, tp: int, nodes_per_replica: int, dtype: WeightDtype
) -> list[str]:
    """Why SGLang would refuse (or mis-shard) this tensor-parallel layout; empty when it's fine."""
    problems: list[str] = []
    if tp < 1 or nodes_per_replica < 1 or gpus_per_node < 1:
        return [f"tp ({tp}), nodes ({nodes_per_replica}) and GPUs per node must be >= 1"]
    heads, kv_heads = model.num_attention_heads, model.num_kv_heads
    if heads % tp:
        problems.append(f"tp {tp} does not divide the model's {heads} attention heads")
    if not model.uses_mla and kv_heads < heads and kv_heads % tp and tp % kv_heads:
        problems.append(
            f"tp {tp} neither divides nor is a multiple of the model's {kv_heads} KV heads"
        )
    if nodes_per_replica == 1 and tp > gpus_per_node:
        problems.append(
            f"tp {tp} needs more GPUs than the {gpus_per_node} of one node; span nodes "
            f"with tp = {gpus_per_node} x nodes"
        )
    if nodes_per_replica > 1 and tp != gpus_per_node * nodes_per_replica:
        problems.append(
            f"a replica over {nodes_per_replica} nodes runs tp = {gpus_per_node} GPUs x "
            f"{nodes_per_replica} nodes = {gpus_per_node * nodes_per_replica}, not {tp}"
        )
    inter, block = model.moe_intermediate_size, model.fp8_block_size
    if dtype == "fp8" and model.dtype == "fp8" and inter and block and (inter // tp) % block:
        problems.append(
            f"FP8 block-quantized experts need moe_intermediate_size / tp ({inter} / {tp}) to be "
            f"a multiple of the {block}-wide scale block; use tp <= {inter // block}"
        )
    return problems


def _evaluate(
    model: ModelArch,
    gpu: GpuModel,
    gpus_per_node: int,
    tp: int,
    nodes_per_replica: int,
    dtype: WeightDtype,
    kv_dtype: KvDtype,
    context: int,
    concurrency: int,
    nodes_total: int | None = None,
) -> SizingReport:
    gpu_gb = gpu.memory_gb
    tp_eff = max(tp, 1)
    w_gpu = _weights_per_gpu_gb(model, dtype, tp_eff)
    kv_bpt = model.kv_elements_per_token_per_gpu(tp_eff) * KV_BYTES[kv_dtype]
    tokens = 0 if model.is_embedding else context * concurrency
    kv_gpu = tokens * kv_bpt / GB
    overhead_gpu = overhead_per_gpu_gb(model, w_gpu)
    need_gpu = w_gpu + kv_gpu + overhead_gpu
    fraction = max(0.0, math.floor((1 - overhead_gpu / gpu_gb) * 100) / 100)
    pool_gb = fraction * gpu_gb - w_gpu
    kv_tokens = int(pool_gb * GB // kv_bpt) if kv_bpt and pool_gb > 0 else 0

    problems = layout_problems(model, gpus_per_node, tp, nodes_per_replica, dtype)
    if context > model.max_context:
        problems.append(
            f"context {context:,} exceeds the model's {model.max_context:,}-token window"
        )
    reasons: list[str] = []
    what = f"{model.name} {dtype}"
    if need_gpu > gpu_gb:
        reasons.append(
            f"{what} needs {need_gpu:.1f} GB per GPU at tp {tp} but {gpu.name} has "
            f"{gpu_gb:.1f} GB (weights alone {w_gpu:.1f} GB); more GPUs or a smaller dtype"
        )
    elif not model.is_embedding and kv_tokens < tokens:
        reasons.append(
            f"the KV cache holds {kv_tokens:,} tokens at tp {tp}, fewer than context x "
            f"concurrency = {tokens:,}"
        )
    reasons.extend(problems)
    fits = not reasons
    if fits:
        room = (
            f"; the KV cache holds {kv_tokens:,} tokens ({kv_tokens / tokens:.1f}x the "
            f"{tokens:,} asked for)"
            if tokens
            else ""
        )
        reasons.append(
            f"{what} fits on {tp} x {gpu.name}: {need_gpu:.1f} of {gpu_gb:.1f} GB per GPU{room}"
        )

    total_nodes = nodes_total if nodes_total is not None else nodes_per_replica
    if nodes_per_replica == 1:
        dp = total_nodes * max(1, gpus_per_node // tp_eff)
    else:
        dp = max(1, total_nodes // nodes_per_replica)
    return SizingReport(
        model=model.hf_id,
        model_params=model.params,
        model_dtype=model.dtype,
        gpu=gpu.name,
        gpu_memory_gb=gpu_gb,
        gpus_per_node=gpus_per_node,
        dtype=dtype,
        kv_dtype=kv_dtype,
        context=context,
        concurrency=concurrency,
        fits=fits,
        required_gb=need_gpu * tp_eff,
        available_gb=gpu_gb * tp_eff,
        weights_gb=w_gpu * tp_eff,
        kv_cache_gb=kv_gpu * tp_eff,
        overhead_gb=overhead_gpu * tp_eff,
        per_gpu_required_gb=need_gpu,
        kv_cache_tokens=kv_tokens,
        kv_bytes_per_token=kv_bpt,
        recommended=Recommendation(
            tp=tp,
            dp=dp,
            nodes=total_nodes,
            nodes_per_replica=nodes_per_replica,
            mem_fraction_static=fraction,
        ),
        reasons=tuple(reasons),
        warnings=tuple(_warnings(model, gpu, gpus_per_node, tp, dtype, kv_dtype, total_nodes)),
    )


def _warnings(
    model: ModelArch,
    gpu: GpuModel,
    gpus_per_node: int,
    tp: int,
    dtype: WeightDtype,
    kv_dtype: KvDtype,
    total_nodes: int,
) -> list[str]:
    notes: list[str] = []
    if not gpu.listed:
        # Its FP8 support and interconnect are unknown: the notes below would state guesses.
        notes.append(
            f"{gpu.name} is not in the GPU catalog: sized by its memory alone "
            f"({gpu.memory_gb:.1f} GB); its speed, FP8 support and interconnect are unknown"
        )
    elif dtype == "fp8" and not gpu.native_fp8:
        notes.append(
            f"{gpu.name} ({gpu.architecture}) has no FP8 tensor cores: SGLang runs FP8 weights "
            "there only through slow weight-only kernels; serve an INT8 (W8A8) checkpoint "
            "instead (--dtype int8), as SGLang's table does for R1 on 16x A100"
        )
    if kv_dtype.startswith("fp8") and not gpu.native_fp8 and gpu.listed:
        notes.append(f"{gpu.name} has no FP8 tensor cores; an FP8 KV cache there is slow")
    if dtype != model.dtype:
        if dtype == "fp8" and model.dtype in ("bf16", "fp16") and gpu.native_fp8:
            notes.append("SGLang quantizes the 16-bit weights to FP8 at load (--quantization fp8)")
        elif dtype in _QUANTIZED:
            notes.append(
                f"needs a checkpoint quantized to {dtype}; the published weights are {model.dtype}"
            )
        else:
            notes.append(
                f"needs the weights converted to {dtype}; the published weights are {model.dtype}"
            )
    if tp > 1 and gpu.interconnect == "pcie" and gpu.listed:
        notes.append(
            f"{gpu.name} GPUs talk over PCIe only: tensor parallelism {tp} is bound by "
            "all-reduce; prefer data parallelism where the model fits on fewer GPUs"
        )
    if tp < gpus_per_node and gpus_per_node % tp:
        notes.append(f"{gpus_per_node % tp} GPU(s) per node stay idle at tp {tp}")
    nodes_per_replica = max(1, tp // gpus_per_node) if tp > gpus_per_node else 1
    if total_nodes % nodes_per_replica:
        notes.append(
            f"{total_nodes % nodes_per_replica} node(s) stay idle: replicas need "
            f"{nodes_per_replica} nodes each"
        )
    return notes


def _layouts(
    model: ModelArch, gpus_per_node: int, max_nodes: int, dtype: WeightDtype
) -> list[tuple[int, int]]:
    """(tp, nodes_per_replica) pairs SGLang accepts, smallest first."""
    single = [(tp, 1) for tp in range(1, gpus_per_node + 1)]
    multi = [(gpus_per_node * n, n) for n in range(2, max_nodes + 1)]
    return [
        (tp, n)
        for tp, n in single + multi
        if not layout_problems(model, gpus_per_node, tp, n, dtype)
    ]


def _parse_dtype(dtype: str | None, model: ModelArch) -> WeightDtype:
    if dtype is None:
        return model.dtype
    key = dtype.strip().lower().replace("bfloat16", "bf16").replace("float16", "fp16")
    key = {"awq": "int4", "gptq": "int4", "w4a8": "int4", "w8a8": "int8"}.get(key, key)
    for known in WEIGHT_DTYPES:
        if key == known:
            return known
    raise UserError(
        "unknown weight dtype",
        [_problem(f"{dtype!r}", "use one of bf16, fp16, fp8, int8, int4")],
    )


def _parse_kv_dtype(kv_dtype: str | None) -> KvDtype:
    key = (kv_dtype or "bf16").strip().lower()
    key = {"fp8": "fp8_e4m3", "auto": "bf16", "bfloat16": "bf16", "float16": "fp16"}.get(key, key)
    for known in KV_DTYPES:
        if key == known:
            return known
    raise UserError(
        "unknown KV cache dtype",
        [_problem(f"{kv_dtype!r}", "use bf16 (default) or fp8_e4m3")],
    )


def _problem(message: str, hint: str) -> Problem:
    return Problem(message, hint=hint)


def _check_positive(**values: int | None) -> None:
    bad = [name for name, value in values.items() if value is not None and value < 1]
    if bad:
        raise UserError(
            "sizing needs positive numbers",
            [_problem(f"{name} must be >= 1", "give a whole number of at least 1") for name in bad],
        )


def _as_model(model: ModelArch | str | os.PathLike[str]) -> ModelArch:
    return model if isinstance(model, ModelArch) else resolve_model(model)


def _as_gpu(gpu: GpuModel | str) -> GpuModel:
    return gpu if isinstance(gpu, GpuModel) else resolve_gpu(gpu)


def size_model(
    model: ModelArch | str | os.PathLike[str],
    gpu: GpuModel | str,
    gpus_per_node: int,
    nodes: int | None = None,
    dtype: str | None = None,
    kv_dtype: str | None = None,
    context: int = DEFAULT_CONTEXT,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> SizingReport:
    """Recommend the smallest layout that serves the model; nodes=None searches for the fewest.

    Raises UserError for unknown names or non-positive numbers; a model that does not fit is
    an answer (fits=False with reasons), not an error.
    """
    _check_positive(
        gpus_per_node=gpus_per_node, nodes=nodes, context=context, concurrency=concurrency
    )
    arch, card = _as_model(model), _as_gpu(gpu)
    weights, kv = _parse_dtype(dtype, arch), _parse_kv_dtype(kv_dtype)
    if context > arch.max_context:
        raise UserError(
            "context longer than the model supports",
            [_problem(f"{context:,} tokens", f"{arch.name} handles up to {arch.max_context:,}")],
        )
    max_nodes = nodes if nodes is not None else MAX_NODES
    layouts = _layouts(arch, gpus_per_node, max_nodes, weights)
    last: SizingReport | None = None
    for tp, per_replica in layouts:
        report = _evaluate(
            arch,
            card,
            gpus_per_node,
            tp,
            per_replica,
            weights,
            kv,
            context,
            concurrency,
            nodes_total=nodes if nodes is not None else per_replica,
        )
        if report.fits:
            return report
        last = report
    if last is None:
        # No tp the engine accepts on this node shape: show the whole-node layout and why.
        return _evaluate(
            arch,
            card,
            gpus_per_node,
            gpus_per_node,
            1,
            weights,
            kv,
            context,
            concurrency,
            nodes_total=nodes or 1,
        )
    if nodes is not None and nodes < MAX_NODES:
        more = size_model(arch, card, gpus_per_node, None, weights, kv, context, concurrency)
        if more.fits:
            hint = (
                f"it fits on {more.recommended.nodes_per_replica} nodes "
                f"(tp {more.recommended.tp}): set nodes to {more.recommended.nodes_per_replica}"
            )
            return dataclasses.replace(last, reasons=(*last.reasons, hint))
    return last


def check_deployment_fits(
    model: ModelArch | str,
    gpu: GpuModel | str,
    gpus_per_node: int,
    nodes_per_replica: int,
    tp: int,
    dtype: str | None = None,
    context: int = DEFAULT_CONTEXT,
    concurrency: int = DEFAULT_CONCURRENCY,
    kv_dtype: str | None = None,
) -> SizingReport:
    """Judge one concrete layout (the spec validator's question). Never raises."""
    try:
        arch, card = _as_model(model), _as_gpu(gpu)
        weights, kv = _parse_dtype(dtype, arch), _parse_kv_dtype(kv_dtype)
        _check_positive(
            gpus_per_node=gpus_per_node,
            nodes_per_replica=nodes_per_replica,
            tp=tp,
            context=context,
            concurrency=concurrency,
        )
    except UserError as error:
        return _unsized(model, gpu, gpus_per_node, tp, nodes_per_replica, error)
    return _evaluate(
        arch, card, gpus_per_node, tp, nodes_per_replica, weights, kv, context, concurrency
    )


def _unsized(
    model: ModelArch | str,
    gpu: GpuModel | str,
    gpus_per_node: int,
    tp: int,
    nodes_per_replica: int,
    error: UserError,
) -> SizingReport:
    details = [p.message + (f" ({p.hint})" if p.hint else "") for p in error.problems]
    return SizingReport(
        model=model.hf_id if isinstance(model, ModelArch) else str(model),
        model_params=0,
        model_dtype="",
        gpu=gpu.name if isinstance(gpu, GpuModel) else str(gpu),
        gpu_memory_gb=0.0,
        gpus_per_node=gpus_per_node,
        dtype="",
        kv_dtype="",
        context=0,
        concurrency=0,
        fits=False,
        required_gb=0.0,
        available_gb=0.0,
        weights_gb=0.0,
        kv_cache_gb=0.0,
        overhead_gb=0.0,
        per_gpu_required_gb=0.0,
        kv_cache_tokens=0,
        kv_bytes_per_token=0,
        recommended=Recommendation(
            tp=tp,
            dp=0,
            nodes=nodes_per_replica,
            nodes_per_replica=nodes_per_replica,
            mem_fraction_static=0.0,
        ),
        reasons=(f"cannot size: {error.title}: {'; '.join(details)}",),
    )


def field_rule_of_thumb_gb(
    model: ModelArch, dtype: WeightDtype | None = None
) -> tuple[float, float]:
    """The recipes' params x bytes x 1.2-1.5 band, for comparison in docs and tests."""
    base = model.params * BYTES_PER_PARAM[dtype or model.dtype] / GB
    return base * 1.2, base * 1.5
