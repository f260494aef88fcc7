"""Sizing against the field tables (docs/sizing.md), hand calculations, and `deepfleet size`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from infra.cli import main
from infra.errors import UserError
from infra.gpus import GpuMemoryMismatch, custom_gpu, declared_gpu, resolve_gpu
from infra.models import resolve_model
from infra.sizing import (
    MOE_RUNTIME_FRACTION,
    RUNTIME_GB_PER_GPU,
    SizingReport,
    check_deployment_fits,
    field_rule_of_thumb_gb,
    size_model,
    weights_gb,
)

FIXTURES = Path(__file__).parent / "fixtures" / "models"
EIGHT_GB_CARD = custom_gpu(8192 * 2**20 / 1e9)  # what nvidia-smi shows for an "8 GB" card


# The recipes' table: "GPU memory needed" (context 8192, concurrency 1), checked on the first
# "typical fit" hardware. The upper bound is the recipes' own 1.5x rule of thumb, or the card.
@pytest.mark.parametrize(
    ("model", "gpu", "gpus", "low", "high"),
    [
        ("qwen-1.5b", EIGHT_GB_CARD, 1, 3.6, 8.59),
        ("qwen-7b", "RTX4090", 1, 20, 24),
        ("llama-8b", "A10", 1, 18, 24),
        ("qwen-14b", "L40", 1, 35, 45),
        ("qwen-32b", "H100", 1, 72, 85),
        ("llama-70b", "H20-141G", 1, 140, 150.75),
        ("r1", "H200", 8, 800, 1007),
    ],
)
def test_required_memory_matches_field_table(
    model: str, gpu: str, gpus: int, low: float, high: float
) -> None:
    report = size_model(model, gpu, gpus_per_node=gpus, nodes=1)
    assert report.fits, report.reasons
    assert low <= report.required_gb <= high


@pytest.mark.parametrize(
    ("model", "gpu", "gpus_per_node", "nodes", "dtype", "fits"),
    [
        ("qwen-1.5b", EIGHT_GB_CARD, 1, 1, None, True),
        # 7B: one 24 GB card (RTX 4090, L40, A10).
        ("qwen-7b", "RTX4090", 1, 1, None, True),
        ("qwen-7b", "L40", 1, 1, None, True),
        ("qwen-7b", "A10", 1, 1, None, True),
        ("llama-8b", "RTX4090", 1, 1, None, True),
        ("llama-8b", "A10", 1, 1, None, True),
        # 14B: 2-4x 48 GB or 24 GB cards; one 24 GB card is too small.
        ("qwen-14b", "A10", 2, 1, None, True),
        ("qwen-14b", "RTX4090", 2, 1, None, True),
        ("qwen-14b", "L40S", 2, 1, None, True),
        ("qwen-14b", "A10", 1, 1, None, False),
        # 32B: 1x 80-96 GB, 3x 48 GB (tp 2: 40 heads don't split 3 ways), 4x 24 GB.
        ("qwen-32b", "H100", 1, 1, None, True),
        ("qwen-32b", "A100-80G", 1, 1, None, True),
        ("qwen-32b", "H20-96G", 1, 1, None, True),
        ("qwen-32b", "L40S", 3, 1, None, True),
        ("qwen-32b", "A10", 4, 1, None, True),
        ("qwen-32b", "RTX4090", 4, 1, None, True),
        ("qwen-32b", "L40S", 1, 1, None, False),
        # 70B: 1x H20-141G, 2x 80 GB, 4x 48 GB, 8x 24 GB; not 1x 80 GB.
        ("llama-70b", "H20-141G", 1, 1, None, True),
        ("llama-70b", "H100", 2, 1, None, True),
        ("llama-70b", "A100-80G", 2, 1, None, True),
        ("llama-70b", "L40S", 4, 1, None, True),
        ("llama-70b", "A10", 8, 1, None, True),
        ("llama-70b", "RTX4090", 8, 1, None, True),
        ("llama-70b", "H100", 1, 1, None, False),
        # R1/V3 FP8: 8x H200 or 8x B200; 2x8 H100/H800/H20; not one node of 80-96 GB cards.
        ("r1", "H200", 8, 1, None, True),
        ("v3", "B200", 8, 1, None, True),
        ("r1", "H100", 8, 2, None, True),
        ("r1", "H800", 8, 2, None, True),
        ("r1", "H20", 8, 2, None, True),
        ("r1", "H100", 8, 1, None, False),
        ("r1", "H20", 8, 1, None, False),
        # SGLang's table: BF16 on 2x8 H200 or 4x8 H100; INT8 on 16x A100; W4A8 on 4x H200.
        ("r1", "H200", 8, 2, "bf16", True),
        ("r1", "H100", 8, 4, "bf16", True),
        ("r1", "H200", 8, 1, "bf16", False),
        ("r1", "H100", 8, 2, "bf16", False),
        ("r1", "A100-80G", 8, 2, "int8", True),
        ("r1", "A100-80G", 8, 1, "int8", False),
        ("r1", "H200", 4, 1, "int4", True),
        ("r1", "H100", 4, 1, "int4", False),
    ],
)
def test_fits_on_field_table_hardware(
    model: str, gpu: str, gpus_per_node: int, nodes: int, dtype: str | None, fits: bool
) -> None:
    report = size_model(model, gpu, gpus_per_node=gpus_per_node, nodes=nodes, dtype=dtype)
    assert report.fits is fits, report.reasons


def test_r1_fp8_within_the_recipes_rule_of_thumb() -> None:
    r1 = resolve_model("r1")
    low, high = field_rule_of_thumb_gb(r1)
    report = size_model(r1, "H200", gpus_per_node=8)
    assert low <= report.required_gb <= high
    assert report.required_gb >= 800


def test_r1_bf16_needs_about_1_4_tb() -> None:
    r1 = resolve_model("r1")
    assert 1340 <= weights_gb(r1, "bf16") <= 1400
    assert weights_gb(r1, "fp8") == pytest.approx(673.0, abs=1.0)
    # ~720 GB on disk includes the 14B MTP layer, which is not loaded without speculation.
    assert weights_gb(r1, "int4") == pytest.approx(353.0, abs=2.0)


@pytest.mark.parametrize(
    ("gpu", "dtype", "nodes"),
    [("H100", "fp8", 2), ("H20", "fp8", 2), ("H200", "fp8", 1), ("H200", "bf16", 2)],
)
def test_minimum_nodes_recommended(gpu: str, dtype: str, nodes: int) -> None:
    report = size_model("r1", gpu, gpus_per_node=8, dtype=dtype)
    assert report.fits
    assert report.recommended.nodes == nodes
    assert report.recommended.tp == 8 * nodes


def test_bf16_r1_on_h100_needs_four_nodes_because_tp_must_divide_128_heads() -> None:
    report = size_model("r1", "H100", gpus_per_node=8, dtype="bf16")
    # Three nodes would hold the weights, but tp 24 does not divide 128 heads.
    assert (report.recommended.tp, report.recommended.nodes) == (32, 4)


def test_fp8_on_a100_fits_by_memory_but_warns_to_use_int8() -> None:
    report = size_model("r1", "A100-80G", gpus_per_node=8, nodes=2)
    assert report.fits
    assert any("INT8" in w and "no FP8" in w for w in report.warnings)
    int8 = size_model("r1", "A100-80G", gpus_per_node=8, nodes=2, dtype="int8")
    assert not any("no FP8" in w for w in int8.warnings)


def test_small_model_on_a_big_node_runs_data_parallel() -> None:
    report = size_model("qwen-7b", "H200", gpus_per_node=8)
    assert (report.recommended.tp, report.recommended.dp) == (1, 8)
    assert report.engine_args()[:4] == ["--tp-size", "1", "--dp-size", "8"]
    two_nodes = size_model("qwen-7b", "H200", gpus_per_node=8, nodes=2)
    assert two_nodes.recommended.dp == 16


# KV cache capacity, by hand -------------------------------------------------------------


def test_kv_capacity_mla_r1_on_8x_h200_by_hand() -> None:
    gpu_gb = 143771 * 2**20 / 1e9  # nvidia-smi total of one H200, in decimal GB
    # Weights: embeddings + LM head stay bf16 (2 x 129280 x 7168 params x 2 bytes); the rest is
    # FP8 with one fp32 scale per 128x128 block. MLA down-projections and routers are whole on
    # every rank; everything else is split 8 ways.
    embed = 2 * 129280 * 7168
    total = 671_026_419_200
    fp8 = 1 + 4 / (128 * 128)
    replicated_params = 61 * (7168 * 1536 + 1536 + 7168 * 576 + 512) + 58 * (256 * 7168 + 256)
    weights_total = embed * 2 + (total - embed) * fp8
    weights_gpu = (replicated_params * fp8 + (weights_total - replicated_params * fp8) / 8) / 1e9
    assert weights_gpu == pytest.approx(85.03, abs=0.01)
    overhead_gpu = RUNTIME_GB_PER_GPU + MOE_RUNTIME_FRACTION * weights_gpu
    fraction = math.floor((1 - overhead_gpu / gpu_gb) * 100) / 100
    assert fraction == 0.88
    # MLA caches one latent per layer for all 128 heads: (512 + 64) x 2 bytes x 61 layers, and
    # each of the 8 ranks holds the whole latent.
    kv_per_token = 61 * (512 + 64) * 2
    assert kv_per_token == 70_272
    tokens = int((fraction * gpu_gb - weights_gpu) * 1e9 // kv_per_token)

    report = size_model("r1", "H200", gpus_per_node=8)
    assert report.kv_bytes_per_token == kv_per_token
    assert report.recommended.mem_fraction_static == fraction
    assert report.kv_cache_tokens == pytest.approx(tokens, abs=1)
    assert 670_000 < report.kv_cache_tokens < 690_000
    assert report.kv_cache_gb == pytest.approx(8 * 8192 * kv_per_token / 1e9)


def test_kv_capacity_gqa_qwen_32b_on_one_h100_by_hand() -> None:
    gpu_gb = 81559 * 2**20 / 1e9
    weights = 32_763_876_352 * 2 / 1e9  # bf16
    fraction = math.floor((1 - RUNTIME_GB_PER_GPU / gpu_gb) * 100) / 100
    assert fraction == 0.94
    # GQA: K and V for 8 KV heads of 128 dims, 64 layers, 2 bytes.
    kv_per_token = 64 * 2 * 8 * 128 * 2
    assert kv_per_token == 262_144
    tokens = int((fraction * gpu_gb - weights) * 1e9 // kv_per_token)

    report = size_model("qwen-32b", "H100", gpus_per_node=1)
    assert report.kv_bytes_per_token == kv_per_token
    assert report.kv_cache_tokens == pytest.approx(tokens, abs=1)
    assert 56_000 < report.kv_cache_tokens < 57_500
    assert report.kv_cache_gb == pytest.approx(8192 * kv_per_token / 1e9)


def test_gqa_kv_heads_replicate_when_tp_exceeds_them() -> None:
    tp8 = check_deployment_fits("llama-70b", "H100", 8, 1, 8)
    tp16 = check_deployment_fits("llama-70b", "H100", 8, 2, 16)
    # 8 KV heads over 16 ranks: each rank still holds one whole head, so the copies double.
    assert tp8.kv_bytes_per_token == tp16.kv_bytes_per_token == 80 * 2 * 1 * 128 * 2
    assert tp16.kv_cache_gb == pytest.approx(2 * tp8.kv_cache_gb)


def test_fp8_kv_cache_halves_the_bytes_per_token() -> None:
    bf16 = size_model("r1", "H200", gpus_per_node=8)
    fp8 = size_model("r1", "H200", gpus_per_node=8, kv_dtype="fp8_e4m3")
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    assert "--kv-cache-dtype" in fp8.engine_args()


def test_concurrency_can_stop_a_fit() -> None:
    # The 70B fits one 141 GB card for one 8k-token request, not for two at once.
    report = size_model("llama-70b", "H20-141G", gpus_per_node=1, nodes=1, concurrency=2)
    assert not report.fits
    assert "per GPU" in report.reason and "141.1 GB" in report.reason


# check_deployment_fits ------------------------------------------------------------------


def test_check_deployment_fits_for_the_spec_validator() -> None:
    ok = check_deployment_fits("r1", "H100", 8, 2, 16, "fp8", 8192, 1)
    assert ok.fits and "fits on 16 x H100" in ok.reason
    assert ok.engine_args()[:4] == ["--tp-size", "16", "--nnodes", "2"]
    too_small = check_deployment_fits("r1", "H100", 8, 1, 8, "fp8", 8192, 1)
    assert not too_small.fits and "85.5 GB" in too_small.reason


@pytest.mark.parametrize(
    ("tp", "nodes", "dtype", "fragment"),
    [
        (12, 2, "fp8", "does not divide"),
        (8, 2, "fp8", "tp = 8 GPUs x 2 nodes = 16"),
        (16, 1, "fp8", "more GPUs than the 8 of one node"),
        (32, 4, "fp8", "multiple of the 128-wide scale block"),
    ],
)
def test_check_deployment_fits_reports_bad_layouts(
    tp: int, nodes: int, dtype: str, fragment: str
) -> None:
    report = check_deployment_fits("r1", "H200", 8, nodes, tp, dtype, 8192, 1)
    assert not report.fits
    assert any(fragment in r for r in report.reasons), report.reasons


def test_gqa_tp_must_match_kv_heads() -> None:
    # Qwen-14B: 40 heads, 8 KV heads; tp 5 divides the heads but splits KV heads unevenly.
    report = check_deployment_fits("qwen-14b", "L40S", 8, 1, 5)
    assert not report.fits and "KV heads" in " ".join(report.reasons)


def test_check_deployment_fits_never_raises() -> None:
    report = check_deployment_fits("deepseek-r2", "H100", 8, 1, 8)
    assert not report.fits and "did you mean" in report.reason
    bad_gpu = check_deployment_fits("r1", "H1000", 8, 1, 8)
    assert not bad_gpu.fits and "unknown GPU" in bad_gpu.reason
    zero = check_deployment_fits("r1", "H100", 8, 1, 0)
    assert not zero.fits


def test_report_to_dict_is_json_ready() -> None:
    data = size_model("r1", "H200", gpus_per_node=8).to_dict()
    json.dumps(data)
    assert set(data["recommended"]) >= {"tp", "dp", "nodes", "mem_fraction_static"}
    parts = data["weights_gb"] + data["kv_cache_gb"] + data["overhead_gb"]
    assert abs(data["required_gb"] - parts) < 0.02


# CLI ------------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["size", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--model", "r1", "--gpu", "H200", "--gpus-per-node", "8", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] is True
    for key in ("required_gb", "available_gb", "kv_cache_tokens", "weights_gb", "kv_cache_gb"):
        assert key in data
    assert {"overhead_gb", "reasons", "warnings", "engine_args"} <= set(data)
    assert data["recommended"]["tp"] == 8 and data["recommended"]["nodes"] == 1
    assert data["recommended"]["mem_fraction_static"] == 0.88


def test_cli_does_not_fit_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "--model", "r1", "--gpu", "H100", "--gpus-per-node", "8", "--nodes", "1"
    )
    assert code == 1
    assert "does not fit" in out and "fits on 2 nodes" in out


def test_cli_human_output_is_a_compact_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--model", "r1", "--gpu", "h100", "--gpus-per-node", "8")
    assert code == 0
    for fragment in ("required", "available", "kv capacity", "tp 16", "--nnodes 2"):
        assert fragment in out
    assert len(out.splitlines()) < 20


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "deepseek-r2", "--gpu", "H100", "--gpus-per-node", "8"], "'deepseek-r1'"),
        (["--model", "r1", "--gpu", "H1000", "--gpus-per-node", "8"], "did you mean 'H100'"),
        (["--model", "r1", "--gpu", "H100", "--gpus-per-node", "0"], "gpus_per_node"),
        (["--model", "r1", "--gpu", "H100", "--gpus-per-node", "8", "--dtype", "fp4"], "dtype"),
        (["--model", "r1", "--gpu", "H100", "--gpus-per-node", "8", "--kv-dtype", "x"], "KV"),
        (["--model", "qwen-7b", "--gpus-per-node", "1"], "no GPU given"),
        (
            ["--model", "bge-m3", "--gpu", "A10", "--gpus-per-node", "1", "--context", "9000"],
            "8,192",
        ),
    ],
)
def test_cli_bad_input_exits_2_with_a_hint(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert fragment in err and "Traceback" not in err


def test_cli_sizes_a_local_model_directory(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys,
        "--model",
        str(FIXTURES / "r1-distill-qwen-32b-awq"),
        "--gpu",
        "L40S",
        "--gpus-per-node",
        "1",
        "--json",
    )
    data = json.loads(out)
    assert code == 0 and data["dtype"] == "int4"
    # 32.8B at 4 bits with group scales plus 16-bit embeddings: about 18 GB.
    assert 17 < data["weights_gb"] < 20


def test_cli_gpu_memory_sizes_an_unlisted_card(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "--model", "qwen-1.5b", "--gpu-memory", "8.59", "--gpus-per-node", "1", "--json"
    )
    data = json.loads(out)
    assert code == 0 and data["available_gb"] == 8.59 and data["recommended"]["tp"] == 1


def test_reports_are_dataclasses_with_reasons() -> None:
    report = size_model("qwen-7b", "A10", gpus_per_node=1)
    assert isinstance(report, SizingReport) and report.reason.startswith("DeepSeek-R1-Distill")
    assert resolve_gpu("A10").memory_gb > report.required_gb


def test_cli_unlisted_gpu_name_with_memory_is_a_custom_card(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(
        capsys,
        *("--model", "r1", "--gpu", "MI300X", "--gpu-memory", "192"),
        *("--gpus-per-node", "8", "--json"),
    )
    data = json.loads(out)
    assert code == 0 and data["gpu"] == "MI300X" and data["available_gb"] == 1536.0
    assert any("MI300X is not in the GPU catalog" in w for w in data["warnings"])
    # Nothing is known about its FP8 units: no claim about them either way.
    assert not any("FP8 tensor cores" in w for w in data["warnings"])


def test_cli_unlisted_gpu_name_without_memory_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _run(capsys, "--model", "r1", "--gpu", "MI300X", "--gpus-per-node", "8")
    assert code == 2 and "--gpu-memory" in err


# --- memory declared next to a GPU name (a spec's nodes[].gpus) ---------------------------------


@pytest.mark.parametrize(
    ("name", "memory_gb", "expected_gb"),
    [
        ("H100", None, 85.52),
        ("H100", 80, 85.52),  # the figure it is sold by
        ("H100", 85.5, 85.52),  # the figure nvidia-smi gives, in GB
        ("H200", 141, 150.76),
        ("L40S", 48, 48.31),
        ("B200", 192, 192.27),
        ("H100", 40, 40.0),  # a MIG slice or vGPU profile: what the engine sees
        ("L40S", 12, 12.0),
        ("A100", 40, 42.95),  # ambiguous by name, not by memory
        ("MI300X", 192, 192.0),
    ],
)
def test_declared_gpu_memory(name: str, memory_gb: float | None, expected_gb: float) -> None:
    assert declared_gpu(name, memory_gb).memory_gb == pytest.approx(expected_gb, abs=0.01)


@pytest.mark.parametrize(
    ("name", "memory_gb", "error"),
    [
        ("L40S", 96, "larger than the board"),
        ("H100", 141, "larger than the board"),
        ("MI300X", None, "unknown GPU model"),
        ("A100", 60, "ambiguous GPU model"),
    ],
)
def test_declared_gpu_memory_rejected(name: str, memory_gb: float | None, error: str) -> None:
    with pytest.raises(UserError, match=error):
        declared_gpu(name, memory_gb)


def test_declared_gpu_memory_above_the_board_names_the_board_that_has_it() -> None:
    with pytest.raises(GpuMemoryMismatch) as raised:
        declared_gpu("H100", 94)
    assert "did you mean model 'H100-NVL'?" in (raised.value.problems[0].hint or "")
