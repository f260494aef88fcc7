"""GPU acceptance: burn-in helpers, measured thresholds and the pass/fail verdict (no GPU needed).

The fixtures under tests/fixtures/burnin/ are real burnin.py reports from the device machines
(docs/acceptance.md); multi-GPU reports below are built from them and marked synthetic.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import math
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.acceptance import burnin
from infra.acceptance.thresholds import (
    MARGIN,
    REFERENCES,
    THRESHOLDS,
    GpuThresholds,
    gpu_model_from_name,
    multi_node_busbw_min,
    thresholds_for,
)
from infra.acceptance.verdict import (
    ExpectedPort,
    IbPort,
    NodeFacts,
    Status,
    evaluate,
    evaluate_multi_node_allreduce,
    load_burnin,
    main,
)
from infra.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "burnin"


def report(gpu: str = "h100") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{gpu}.json").read_text())
    return data


def node_report(gpu: str = "h100", count: int = 8) -> dict[str, Any]:
    """Synthetic: the measured single-GPU report cloned to `count` GPUs with an all-reduce table."""
    data = report(gpu)
    one = data["gpus"][0]
    data["gpus"] = [dict(copy.deepcopy(one), index=i) for i in range(count)]
    data["gpu_count"] = count
    rows = []
    for size in burnin.DEFAULT_ALLREDUCE_SIZES:
        seconds = size / 200e9  # algbw 200 GB/s, made up
        algbw, busbw = burnin.allreduce_bandwidths(size, seconds, count)
        rows.append({"bytes": size, "algbw_gbps": algbw, "busbw_gbps": busbw, "correct": True})
    data["allreduce"] = {
        "status": "ok",
        "ranks": count,
        "results": rows,
        "peak_busbw_gbps": max(row["busbw_gbps"] for row in rows),
    }
    return data


# --- burnin.py: pure helpers ----------------------------------------------------------------


@pytest.mark.parametrize(("ranks", "factor"), [(1, 0.0), (2, 1.0), (4, 1.5), (8, 1.75)])
def test_busbw_factor_matches_nccl_tests(ranks: int, factor: float) -> None:
    assert burnin.allreduce_busbw_factor(ranks) == pytest.approx(factor)


def test_allreduce_bandwidths() -> None:
    algbw, busbw = burnin.allreduce_bandwidths(1 << 30, 0.005, 8)
    assert algbw == pytest.approx((1 << 30) / 0.005 / 1e9)
    assert busbw == pytest.approx(algbw * 2 * 7 / 8)
    with pytest.raises(ValueError, match="ranks"):
        burnin.allreduce_busbw_factor(0)


def test_rate_arithmetic() -> None:
    assert burnin.matmul_flops(8192, 8192, 8192) == 2 * 8192**3
    assert burnin.tflops(2 * 8192**3, 1.6e-3) == pytest.approx(687.2, abs=0.1)
    assert burnin.copy_bytes_moved(1 << 30) == 2 << 30
    assert burnin.gbps(3e9, 1.0) == pytest.approx(3.0)
    assert burnin.median([3.0, 1.0, 2.0, 10.0]) == 2.5
    with pytest.raises(ValueError):
        burnin.median([])


@pytest.mark.parametrize(
    ("text", "size"),
    [("1M", 1 << 20), ("64MiB", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10), ("4096", 4096)],
)
def test_parse_size(text: str, size: int) -> None:
    assert burnin.parse_size(text) == size


def test_human_bytes() -> None:
    assert [burnin.human_bytes(s) for s in burnin.DEFAULT_ALLREDUCE_SIZES] == [
        "1 MiB",
        "4 MiB",
        "16 MiB",
        "64 MiB",
        "256 MiB",
        "1 GiB",
    ]


def test_parse_nvidia_smi_csv() -> None:
    output = (
        "0, GPU-7ba2cf2c-a802, 580.159.04, 0, 42, 345, 74.96\n"
        "1, GPU-11111111-2222, 580.159.04, [N/A], 40, 1980, [N/A]\n"
        "garbage line\n"
    )
    rows = burnin.parse_nvidia_smi_csv(output)
    assert [row["index"] for row in rows] == [0, 1]
    assert rows[0]["ecc_uncorrected_volatile"] == 0
    assert rows[0]["power_w"] == pytest.approx(74.96)
    assert rows[1]["ecc_uncorrected_volatile"] is None
    assert rows[1]["power_w"] is None


def test_parse_load_probe_without_event_reasons() -> None:
    probe = burnin.parse_load_probe("1425, 700.53, 700.00, 63\n")
    assert probe == {
        "sm_clock_mhz": 1425.0,
        "power_w": 700.53,
        "power_limit_w": 700.0,
        "temperature_c": 63.0,
    }


def test_uuid_key_matches_torch_and_nvidia_smi_forms() -> None:
    assert burnin.uuid_key("GPU-983F93D4-e97f") == burnin.uuid_key("983f93d4-e97f")
    assert burnin.uuid_key("") is None


def test_one_gpu_allreduce_is_not_applicable_without_torch() -> None:
    # This venv has no torch: the one-GPU answer must not need it.
    result = burnin.measure_allreduce(1, burnin.DEFAULT_ALLREDUCE_SIZES)
    assert result["status"] == "not-applicable"
    assert result["reason"] == "not applicable (1 GPU)"


def test_burnin_is_standalone() -> None:
    """The deploy copies burnin.py alone into the engine container: stdlib + torch only."""
    tree = ast.parse(Path(burnin.__file__).read_text())
    top_level: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert top_level - set(sys.stdlib_module_names) == {"torch"}
    # torch is only imported inside functions, so the module imports without it.
    assert all(
        not (isinstance(node, (ast.Import, ast.ImportFrom)) and "torch" in ast.unparse(node))
        for node in tree.body
    )


def test_burnin_forces_nvlink_multicast_off() -> None:
    assert burnin.NO_MULTICAST_ENV["NCCL_NVLS_ENABLE"] == "0"
    defaults = burnin.build_parser().parse_args([])
    assert defaults.sizes == list(burnin.DEFAULT_ALLREDUCE_SIZES)
    assert defaults.backend == "nccl"


def test_render_text_of_a_measured_report() -> None:
    text = burnin.render_text(report("h100"))
    assert "NVIDIA H100 80GB HBM3" in text
    assert "not applicable (1 GPU)" in text
    synthetic = burnin.render_text(node_report("h200", 8) | {"allreduce": _table(8)})
    assert "busbw GB/s" in synthetic and "1 GiB" in synthetic


def _table(ranks: int) -> dict[str, Any]:
    rows = [
        {
            "size": burnin.human_bytes(size),
            "time_us": 10.0,
            "algbw_gbps": 1.0,
            "busbw_gbps": 1.75,
            "correct": True,
        }
        for size in burnin.DEFAULT_ALLREDUCE_SIZES
    ]
    return {"status": "ok", "ranks": ranks, "results": rows}


def test_fixtures_are_real_reports() -> None:
    for gpu in ("h100", "h200"):
        data = report(gpu)
        assert data["schema"] == burnin.SCHEMA
        assert data["versions"]["torch"].startswith("2.11")
        assert data["allreduce"]["reason"] == "not applicable (1 GPU)"


# --- thresholds -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(THRESHOLDS))
def test_minimums_are_the_margin_of_the_measurement(model: str) -> None:
    limits, ref = THRESHOLDS[model], REFERENCES[model]
    assert limits.matmul_tflops_min == math.floor(MARGIN * ref.matmul_tflops)
    assert limits.copy_gbps_min == math.floor(MARGIN * ref.copy_gbps)
    assert ref.matmul_tflops / 2 < limits.matmul_tflops_min < ref.matmul_tflops * 0.9
    assert ref.copy_gbps / 2 < limits.copy_gbps_min < ref.copy_gbps * 0.9


@pytest.mark.parametrize("model", sorted(THRESHOLDS))
def test_threshold_models_exist_in_the_gpu_catalog(model: str) -> None:
    gpus = pytest.importorskip("infra.gpus")
    assert gpus.resolve_gpu(model).name == model


@pytest.mark.parametrize(
    ("name", "memory", "model"),
    [
        ("NVIDIA H100 80GB HBM3", None, "H100"),
        ("NVIDIA H100 PCIe", None, "H100-PCIE"),
        ("NVIDIA H100 NVL", None, "H100-NVL"),
        ("NVIDIA H200", None, "H200"),
        ("NVIDIA H800", None, "H800"),
        ("NVIDIA H20", 97871 * 2**20, "H20-96G"),
        ("NVIDIA A100-SXM4-80GB", None, "A100-80G"),
        ("NVIDIA A100-SXM4-40GB", None, "A100-40G"),
        ("NVIDIA A10", None, "A10"),
        ("NVIDIA L40S", None, "L40S"),
        ("NVIDIA GeForce RTX 4090", None, "RTX4090"),
        ("Tesla T4", None, None),
    ],
)
def test_gpu_model_from_device_name(name: str, memory: int | None, model: str | None) -> None:
    assert gpu_model_from_name(name, memory) == model


def test_thresholds_lookup_ignores_case_and_dashes() -> None:
    assert thresholds_for("h-100") is THRESHOLDS["H100"]
    assert thresholds_for("A100-80G") is None


# --- verdict --------------------------------------------------------------------------------


@pytest.mark.parametrize(("gpu", "model"), [("h100", "H100"), ("h200", "H200")])
def test_measured_healthy_gpu_passes(gpu: str, model: str) -> None:
    verdict = evaluate(expected_model=model, expected_count=1, burnin=report(gpu))
    assert verdict.status is Status.PASS, verdict.render()
    assert verdict.check("gpu0.matmul_tflops").status is Status.PASS
    assert verdict.check("nccl.allreduce").status is Status.NOT_APPLICABLE
    assert verdict.check("nccl.allreduce").message == "not applicable (1 GPU)"


def test_healthy_h100_node_passes() -> None:
    verdict = evaluate(
        expected_model="H100",
        expected_count=8,
        burnin=node_report("h100", 8),
        facts=NodeFacts(
            ecc_uncorrected=dict.fromkeys(range(8), 0),
            xid_codes=[],
            ib_ports=[IbPort(f"mlx5_{i}", 1, "Active", "LinkUp", 400) for i in range(8)],
        ),
        expected_ports=[ExpectedPort(f"mlx5_{i}", 1, 400) for i in range(8)],
    )
    assert verdict.passed, verdict.render()
    assert verdict.check("nccl.allreduce").status is Status.PASS
    # No multi-GPU measurement yet, so no bus-bandwidth minimum: reported, not judged.
    assert verdict.check("nccl.allreduce_busbw").status is Status.NOT_APPLICABLE


@pytest.mark.parametrize("metric", ["matmul_tflops", "copy_gbps"])
def test_gpu_at_half_rate_fails(metric: str) -> None:
    data = node_report("h100", 8)
    data["gpus"][3][metric] /= 2
    verdict = evaluate(expected_model="H100", expected_count=8, burnin=data)
    assert verdict.status is Status.FAIL
    assert [check.name for check in verdict.failures] == [f"gpu3.{metric}"]
    assert "below the minimum" in verdict.failures[0].message


def test_missing_gpu_fails_naming_the_count() -> None:
    data = node_report("h100", 7)
    verdict = evaluate(expected_model="H100", expected_count=8, burnin=data)
    failed = verdict.check("gpu.count")
    assert failed.status is Status.FAIL
    assert (failed.measured, failed.expected) == (7, 8)
    assert "7 of 8 GPUs" in failed.message
    assert [check.name for check in verdict.failures] == ["gpu.count"]


def test_down_ib_port_fails() -> None:
    ports = [IbPort("mlx5_0", 1, "Active", "LinkUp", 400), IbPort("mlx5_1", 1, "Down", "Polling")]
    verdict = evaluate(
        expected_model="H100",
        expected_count=1,
        burnin=report("h100"),
        facts=NodeFacts(ib_ports=ports),
        expected_ports=[ExpectedPort("mlx5_0", 1, 400), ExpectedPort("mlx5_1", 1, 400)],
    )
    assert verdict.status is Status.FAIL
    assert [check.name for check in verdict.failures] == ["ib.mlx5_1/1"]
    assert "Down/Polling" in verdict.failures[0].message
    assert verdict.check("ib.mlx5_0/1").status is Status.PASS


def test_sysfs_port_states_are_understood() -> None:
    facts = NodeFacts(ib_ports=[IbPort("mlx5_0", 1, "4: ACTIVE", "5: LinkUp", 200)])
    verdict = evaluate(expected_model=None, expected_count=0, burnin=None, facts=facts)
    assert verdict.check("ib.mlx5_0/1").status is Status.PASS


def test_degraded_and_missing_ports_fail() -> None:
    verdict = evaluate(
        expected_model=None,
        expected_count=0,
        burnin=None,
        facts=NodeFacts(ib_ports=[IbPort("mlx5_0", 1, "Active", "LinkUp", 100)]),
        expected_ports=[ExpectedPort("mlx5_0", 1, 200), ExpectedPort("mlx5_1")],
    )
    assert verdict.check("ib.mlx5_0/1").status is Status.FAIL
    assert "100 Gb/s" in verdict.check("ib.mlx5_0/1").message
    assert verdict.check("ib.mlx5_1/1").measured == "missing"


def test_spec_ports_without_facts_fail() -> None:
    verdict = evaluate(
        expected_model="H100",
        expected_count=1,
        burnin=report("h100"),
        expected_ports=[ExpectedPort("mlx5_0")],
    )
    assert verdict.check("ib.ports").status is Status.FAIL
    assert "ibstat" in verdict.check("ib.ports").message


def test_lab_node_without_gpus_is_not_applicable() -> None:
    verdict = evaluate(expected_model=None, expected_count=0, burnin=None, node="lab-1")
    assert verdict.check("gpu.checks").status is Status.NOT_APPLICABLE
    assert verdict.status is Status.NOT_APPLICABLE
    assert verdict.passed
    assert verdict.render().startswith("lab-1: NOT-APPLICABLE")
    # A lab report from a machine without CUDA says so and still is not-applicable.
    no_cuda = {"schema": burnin.SCHEMA, "gpu_count": 0, "gpus": [], "errors": ["no CUDA"]}
    assert evaluate(expected_model=None, expected_count=0, burnin=no_cuda).passed


def test_gpus_the_spec_does_not_list_fail() -> None:
    verdict = evaluate(expected_model=None, expected_count=0, burnin=report("h100"))
    assert verdict.check("gpu.count").status is Status.FAIL


def test_wrong_model_fails() -> None:
    verdict = evaluate(expected_model="H100", expected_count=1, burnin=report("h200"))
    assert [check.name for check in verdict.failures] == ["gpu0.model"]
    assert "the spec says H100" in verdict.failures[0].message


def test_model_without_thresholds_is_not_applicable() -> None:
    data = report("h100")
    data["gpus"][0]["name"] = "NVIDIA A100-SXM4-80GB"
    verdict = evaluate(expected_model="A100-80G", expected_count=1, burnin=data)
    assert verdict.passed
    check = verdict.check("gpu0.matmul_tflops")
    assert check.status is Status.NOT_APPLICABLE
    assert "thresholds.py" in check.message


def test_no_burnin_for_a_gpu_node_fails() -> None:
    verdict = evaluate(expected_model="H100", expected_count=8, burnin=None)
    assert verdict.check("gpu.burnin").status is Status.FAIL


@pytest.mark.parametrize("error", [float("nan"), 0.5])
def test_wrong_results_fail(error: float) -> None:
    data = report("h100")
    data["gpus"][0]["matmul_rel_error"] = error
    verdict = evaluate(expected_model="H100", expected_count=1, burnin=data)
    assert [check.name for check in verdict.failures] == ["gpu0.matmul_accuracy"]


def test_burnin_errors_fail() -> None:
    data = node_report("h100", 2)
    data["gpus"][1] = {"index": 1, "name": "NVIDIA H100 80GB HBM3", "error": "CUDA error: ECC"}
    data["errors"] = ["GPU 1: CUDA error: ECC"]
    verdict = evaluate(expected_model="H100", expected_count=2, burnin=data)
    assert {check.name for check in verdict.failures} == {"gpu.burnin", "gpu1.burnin"}


def test_ecc_errors_fail_from_report_or_facts() -> None:
    data = report("h100")
    data["gpus"][0]["ecc_uncorrected_volatile"] = 2
    verdict = evaluate(expected_model="H100", expected_count=1, burnin=data)
    assert verdict.check("gpu.ecc").status is Status.FAIL
    facts = NodeFacts(ecc_uncorrected={0: 0, 5: 1})
    verdict = evaluate(expected_model="H100", expected_count=1, burnin=report(), facts=facts)
    assert "GPU 5: 1" in verdict.check("gpu.ecc").message


@pytest.mark.parametrize(("codes", "status"), [([79], Status.FAIL), ([13, 31], Status.PASS)])
def test_xids(codes: list[int], status: Status) -> None:
    verdict = evaluate(
        expected_model="H100",
        expected_count=1,
        burnin=report(),
        facts=NodeFacts(xid_codes=codes),
    )
    assert verdict.check("node.xid").status is status


def test_failed_allreduce_fails() -> None:
    data = node_report("h200", 8)
    data["allreduce"] = {"status": "failed", "reason": "timed out after 240 s (hung NCCL?)"}
    verdict = evaluate(expected_model="H200", expected_count=8, burnin=data)
    assert [check.name for check in verdict.failures] == ["nccl.allreduce"]
    assert "hung NCCL" in verdict.failures[0].message


def test_allreduce_busbw_judged_when_a_minimum_exists() -> None:
    ref = REFERENCES["H200"]
    table = {
        "H200": GpuThresholds.from_reference(
            "H200", type(ref)(**{**ref.__dict__, "allreduce_busbw_gbps": 700.0})
        )
    }
    data = node_report("h200", 8)  # synthetic peak busbw 350 GB/s: half of 700
    verdict = evaluate(expected_model="H200", expected_count=8, burnin=data, thresholds=table)
    assert [check.name for check in verdict.failures] == ["nccl.allreduce_busbw"]
    data["allreduce"]["peak_busbw_gbps"] = 690.0
    verdict = evaluate(expected_model="H200", expected_count=8, burnin=data, thresholds=table)
    assert verdict.passed


def test_verdict_serialises() -> None:
    verdict = evaluate(expected_model="H100", expected_count=1, burnin=report(), node="gpu-1")
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["status"] == "pass"
    assert {"name", "status", "measured", "expected", "message"} <= set(data["checks"][0])


# --- loading and the command line -----------------------------------------------------------


def test_load_burnin_errors_are_for_humans(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_burnin(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[burnin 18:14:31] GPU 0 ...\n")
    with pytest.raises(UserError) as info:
        load_burnin(bad)
    assert f"{bad}:1:" in info.value.render()
    other = tmp_path / "other.json"
    other.write_text('{"schema": "nccl-tests"}')
    with pytest.raises(UserError, match="not a burn-in report"):
        load_burnin(other)


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(FIXTURES / "h100.json"), "--model", "H100", "--count", "1"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main([str(FIXTURES / "h100.json"), "--model", "H100", "--count", "8", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "fail"
    assert main(["/nonexistent.json", "--count", "1"]) == 2


# --- the all-reduce across the nodes of a multi-node replica ------------------------------------

REPLICA = ("gpu-01", "gpu-02")


def replica_reports(
    gpus_per_node: int = 8, busbw: float = 180.0, nodes: tuple[str, ...] = REPLICA
) -> dict[str, dict[str, Any] | None]:
    """Synthetic: what `burnin.py --allreduce-only --nnodes 2` prints on each node."""
    world = gpus_per_node * len(nodes)
    factor = burnin.allreduce_busbw_factor(world)
    rows = [
        {
            "bytes": size,
            "size": burnin.human_bytes(size),
            "algbw_gbps": busbw / factor,
            "busbw_gbps": busbw * size / burnin.GIB,  # rises with the message size
            "correct": True,
        }
        for size in burnin.DEFAULT_ALLREDUCE_SIZES
    ]
    return {
        name: {
            "schema": burnin.SCHEMA,
            "host": name,
            "gpu_count": gpus_per_node,
            "gpus": [],
            "errors": [],
            "allreduce": {
                "status": "ok",
                "ranks": world,
                "nodes": len(nodes),
                "ranks_per_node": gpus_per_node,
                "node_rank": rank,
                "results": rows,
                "peak_busbw_gbps": busbw,
            },
        }
        for rank, name in enumerate(nodes)
    }


def judge_replica(
    reports: dict[str, dict[str, Any] | None],
    problems: dict[str, str] | None = None,
    table: dict[tuple[str, int, int], float] | None = None,
) -> Any:
    return evaluate_multi_node_allreduce(
        replica="r1 replica 1",
        nodes=REPLICA,
        gpus_per_node=8,
        expected_model="H100",
        reports=reports,
        problems=problems,
        **({"table": table} if table is not None else {}),
    )


def test_replica_allreduce_is_reported_not_judged_without_a_minimum() -> None:
    verdict = judge_replica(replica_reports())
    assert verdict.passed and verdict.node == "r1 replica 1"
    ok = verdict.check("nccl.allreduce_nodes")
    assert ok.status is Status.PASS and "2 nodes x 8 GPUs (16 ranks, gpu-01, gpu-02)" in ok.message
    busbw = verdict.check("nccl.allreduce_nodes_busbw")
    assert busbw.status is Status.NOT_APPLICABLE and busbw.measured == 180.0
    assert "180 GB/s at 1 GiB: reported, not judged" in busbw.message
    assert "MULTI_NODE_ALLREDUCE_BUSBW_GBPS_MIN" in busbw.message


def test_replica_allreduce_busbw_judged_when_a_minimum_exists() -> None:
    table = {("H100", 2, 8): 150.0}
    assert multi_node_busbw_min("h100", 2, 8, table) == 150.0
    assert multi_node_busbw_min("H100", 2, 4, table) is None  # another shape: not measured
    assert multi_node_busbw_min(None, 2, 8, table) is None
    assert judge_replica(replica_reports(busbw=180.0), table=table).passed
    slow = judge_replica(replica_reports(busbw=75.0), table=table)
    assert [check.name for check in slow.failures] == ["nccl.allreduce_nodes_busbw"]
    assert "50% of it" in slow.failures[0].message and "ibstat" in slow.failures[0].message


def test_replica_allreduce_failure_names_the_node_that_broke_it() -> None:
    reports = replica_reports()
    reports["gpu-01"] = {
        "errors": ["all-reduce: timed out after 360 s (hung NCCL, or a node that never joined?)"],
        "allreduce": {"status": "failed", "reason": "timed out after 360 s", "ranks": 16},
    }
    reports["gpu-02"] = None
    verdict = judge_replica(reports, {"gpu-02": "unreachable (192.0.2.12): No route to host"})
    [failure] = verdict.failures
    assert failure.name == "nccl.allreduce_nodes"
    assert "failed; gpu-01 (rank 0): timed out after 360 s; gpu-02: unreachable (192.0.2.12)" in (
        failure.message
    )
    # rank 0 says "ok" but a peer failed: its part is unknown, so the replica fails too.
    reports = replica_reports()
    reports["gpu-02"] = None
    verdict = judge_replica(reports, {"gpu-02": "exit 1, no report: docker: image not found"})
    assert "gpu-01 (rank 0): finished; gpu-02: exit 1, no report" in verdict.failures[0].message
    assert "gpu-01 (rank 0): no report came back" in judge_replica({}).failures[0].message


def test_replica_allreduce_with_too_few_ranks_fails() -> None:
    reports = replica_reports(gpus_per_node=7)  # a node lost a GPU and ran with what it had
    verdict = judge_replica(reports)
    assert "14 ranks instead of 16" in verdict.check("nccl.allreduce_nodes").message
    assert not judge_replica({}).passed  # no report at all


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--nnodes", "2"], "--nnodes > 1 needs --master-port"),
        (["--nnodes", "2", "--node-rank", "2", "--master-port", "29500"], "0..1, got 2"),
        (["--master-port", "70000"], "1..65535"),
        (["--ranks", "0"], "--ranks must be at least 1"),
        (["--rendezvous-timeout-s", "0"], "must be positive"),
    ],
)
def test_bad_multi_node_arguments_exit_2_before_torch(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert burnin.main(argv) == 2
    assert words in capsys.readouterr().err


def test_one_rank_on_one_node_needs_no_torch_but_two_nodes_make_a_world() -> None:
    one = burnin.measure_allreduce(1, [burnin.MIB], rendezvous=burnin.Rendezvous())
    assert one["status"] == "not-applicable" and one["ranks"] == 1 and "nodes" not in one
    parsed = burnin.build_parser().parse_args(
        ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29500"]
    )
    meet = burnin.rendezvous_of(parsed)
    assert meet == burnin.Rendezvous(2, 1, "10.0.0.1", 29500, burnin.RENDEZVOUS_TIMEOUT_S)
    assert meet.problems() == []


# A real run of the multi-node code path: two burnin.py processes on loopback stand in for two
# nodes (gloo, CPU tensors). Needs torch, which this project's venv does not have: it runs where
# torch is (the device machine's python3; docs/acceptance.md records the run).
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="needs torch (not in the project venv)"
)
BURNIN = Path(burnin.__file__)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_node(rank: int, nnodes: int, ranks: int, port: int, timeout_s: float) -> Any:
    argv = [sys.executable, str(BURNIN), "--json", "--allreduce-only", "--backend", "gloo"]
    argv += ["--ranks", str(ranks), "--nnodes", str(nnodes), "--node-rank", str(rank)]
    argv += ["--master-addr", "127.0.0.1", "--master-port", str(port), "--sizes", "1M,4M"]
    argv += ["--rendezvous-timeout-s", str(timeout_s)]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@needs_torch
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_two_nodes_meet_over_loopback_with_gloo(ranks: int) -> None:
    port = _port()
    procs = [_start_node(rank, 2, ranks, port, 60) for rank in (0, 1)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    reports = {name: json.loads(out) for name, (out, _) in zip(REPLICA, outputs, strict=True)}
    head = reports["gpu-01"]["allreduce"]
    assert (head["ranks"], head["nodes"], head["ranks_per_node"]) == (2 * ranks, 2, ranks)
    assert [row["bytes"] for row in head["results"]] == [burnin.MIB, 4 * burnin.MIB]
    assert all(row["correct"] and row["busbw_gbps"] > 0 for row in head["results"])
    # The figures are reduced across the world: node 1 holds the same table as rank 0.
    assert reports["gpu-02"]["allreduce"]["results"] == head["results"]
    verdict = evaluate_multi_node_allreduce(
        replica="r1 replica 1",
        nodes=REPLICA,
        gpus_per_node=ranks,
        expected_model=None,
        reports=reports,
    )
    assert verdict.passed and verdict.check("nccl.allreduce_nodes").status is Status.PASS


@needs_torch
@pytest.mark.slow
def test_a_node_that_never_joins_fails_rank_0() -> None:
    proc = _start_node(0, 2, 1, _port(), 5)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    data = json.loads(out)
    assert data["allreduce"]["status"] == "failed"
    verdict = judge_replica({"gpu-01": data, "gpu-02": None}, {"gpu-02": "exit 2, no report"})
    assert "gpu-02: exit 2, no report" in verdict.check("nccl.allreduce_nodes").message
