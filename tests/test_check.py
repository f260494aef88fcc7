"""deepfleet check: parsers and verdicts on captured probe outputs (tests/fixtures/check/), no GPU.

Each fixture is what `probe_script` prints on a node (sections of raw command output); a new
fault is a new fixture file and a row in CASES.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from infra import check
from infra.acceptance.verdict import Status
from infra.cli import main
from infra.spec import load_spec
from tests.conftest import HOSTS

FIXTURES = Path(__file__).parent / "fixtures" / "check"
BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
LAB = load_spec(HOSTS / "lab.yaml")
GPU_01 = check.expectations(BAREMETAL, BAREMETAL.node("gpu-01"))


def _sections(name: str) -> dict[str, check.Section]:
    return check.parse_sections((FIXTURES / name).read_text())


def _burnin(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def _failed(verdict: check.Verdict) -> dict[str, str]:
    return {c.name: c.message for c in verdict.failures}


def test_healthy_hgx_node_passes_with_burnin() -> None:
    verdict = check.evaluate_node(
        GPU_01, _sections("healthy-hgx.txt"), burnin=_burnin("burnin-h100x8.json")
    )
    assert verdict.status is Status.PASS, verdict.render()
    names = {c.name for c in verdict.checks}
    for expected in (
        "gpu.driver",
        "gpu.visible",
        "gpu.model",
        "gpu.persistence",
        "gpu.fabricmanager",
        "gpu.nvlink",
        "gpu.count",
        "gpu3.matmul_tflops",
        "nccl.allreduce",
        "gpu.ecc",
        "node.xid",
        "ib.mlx5_0/1",
        "ib.mlx5_1/1",
        "node.clock",
        "node.dns",
        "model.deepseek-r1.files",
        "model.deepseek-r1.checksum",
        "engine.r1.r1",
    ):
        assert expected in names, expected


CASES = [
    # fixture, burn-in report, checks that must fail, words in the first one's message
    ("missing-gpu.txt", None, {"gpu.visible", "node.xid"}, "7 of 8 GPUs visible"),
    ("ib-port-down.txt", None, {"ib.mlx5_1/1"}, "Down/Disabled"),
    ("clock-offset.txt", None, {"node.clock"}, "0.250 s off"),
    ("dns-failure.txt", None, {"node.dns"}, "cannot resolve lb-01, storage-01"),
    ("checksum-mismatch.txt", None, {"model.deepseek-r1.checksum"}, "model-00042-of-000163"),
    ("driver-mismatch.txt", None, {"gpu.driver"}, "Driver/library version mismatch"),
    ("nvlink-down.txt", None, {"gpu.fabricmanager", "gpu.nvlink"}, "inactive"),
    ("healthy-hgx.txt", "burnin-slow-gpu.json", {"gpu3.matmul_tflops"}, "below the minimum"),
]


@pytest.mark.parametrize(
    ("fixture", "burnin", "failing", "words"), CASES, ids=[c[0] + (c[1] or "") for c in CASES]
)
def test_a_fault_fails_exactly_its_checks(
    fixture: str, burnin: str | None, failing: set[str], words: str
) -> None:
    verdict = check.evaluate_node(
        GPU_01, _sections(fixture), burnin=_burnin(burnin) if burnin else None
    )
    failed = _failed(verdict)
    assert set(failed) == failing, verdict.render()
    first = sorted(failing)[0]
    assert words in failed[first] or any(words in m for m in failed.values()), failed


def test_missing_gpu_names_xid_79() -> None:
    verdict = check.evaluate_node(GPU_01, _sections("missing-gpu.txt"))
    assert "79 (GPU has fallen off the bus)" in verdict.check("node.xid").message


def test_without_burnin_the_gpu_burnin_is_not_applicable_and_says_why() -> None:
    verdict = check.evaluate_node(
        GPU_01, _sections("healthy-hgx.txt"), burnin_note="not run: pass --burnin"
    )
    assert verdict.status is Status.PASS
    assert verdict.check("gpu.burnin").status is Status.NOT_APPLICABLE
    assert verdict.check("gpu.ecc").status is Status.PASS  # from nvidia-smi, not the burn-in


def test_lab_node_passes_with_gpu_checks_not_applicable() -> None:
    exp = check.expectations(LAB, LAB.node("gpu-01"))
    verdict = check.evaluate_node(exp, _sections("lab-gpu-01.txt"))
    assert verdict.passed and not verdict.failures, verdict.render()
    assert verdict.check("gpu.checks").status is Status.NOT_APPLICABLE
    assert "lab: no GPUs" in verdict.check("gpu.checks").message
    assert verdict.check("node.clock").status is Status.PASS
    assert verdict.check("engine.chat.r1").status is Status.PASS
    # The lab probes no nvidia-smi, NVLink or ibstat at all.
    assert {name for name, _ in check.probe_commands(exp)} == {
        "xid",
        "clock",
        "dns",
        "model:r1-distill-qwen-7b",
        "engine:chat:1",
    }


def test_unsynchronised_clock_fails_outside_the_lab() -> None:
    sections = dict(_sections("healthy-hgx.txt"))
    clock = sections["clock"]
    sections["clock"] = check.Section(
        "clock",
        0,
        clock.output.replace("Leap status     : Normal", "Leap status     : Not synchronised"),
    )
    assert "not synchronised" in _failed(check.evaluate_node(GPU_01, sections))["node.clock"]


def test_probe_script_is_valid_sh_and_round_trips(tmp_path: Path) -> None:
    script = check.probe_script(GPU_01)
    path = tmp_path / "probe.sh"
    path.write_text(script)
    subprocess.run(["sh", "-n", str(path)], check=True)
    # Run it here: no GPU, no chrony; every section still comes back, each with its code.
    result = subprocess.run(["sh", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    sections = check.parse_sections(result.stdout)
    assert set(sections) == {name for name, _ in check.probe_commands(GPU_01)}
    assert sections["gpus"].rc != 0 or "NVIDIA" in sections["gpus"].output


def test_parsers_on_captured_outputs() -> None:
    sections = _sections("healthy-hgx.txt")
    ports = check.parse_ibstat(sections["ibstat"].output)
    assert [(p.label, p.state, p.physical_state, p.rate_gbps) for p in ports] == [
        ("mlx5_0/1", "Active", "LinkUp", 200.0),
        ("mlx5_1/1", "Active", "LinkUp", 200.0),
    ]
    clock = check.parse_chrony_tracking(sections["clock"].output)
    assert clock.offset_s == pytest.approx(-0.000002345) and clock.synchronised
    assert check.parse_nvlink(sections["nvlink"].output)[7] == (18, 0)
    gpus = check.parse_gpu_query(sections["gpus"].output)
    assert len(gpus) == 8 and gpus[0].memory_mib == 81559 and gpus[0].persistence
    timesyncd = check.parse_timesync_status(
        "       Server: 192.0.2.2 (ntp.example)\n       Offset: -1.234ms\n         Leap: normal\n"
    )
    assert timesyncd.offset_s == pytest.approx(-0.001234) and timesyncd.synchronised
    assert check.parse_xids(
        "NVRM: Xid (PCI:0000:18:00): 13, pid=1\nNVRM: Xid (PCI:0000:9a:00): 79, x"
    ) == [13, 79]


def test_node_ready_reads_the_fact_output_for_the_deploy() -> None:
    text = (FIXTURES / "ib-port-down.txt").read_text()
    verdict = check.node_ready(BAREMETAL, "gpu-01", text)
    assert not verdict.passed and "ib.mlx5_1/1" in _failed(verdict)


def test_burnin_runs_in_the_engine_image_with_all_gpus() -> None:
    command = check.burnin_command("lmsysorg/sglang:v0.5.3-cu129")
    assert "docker run --rm --gpus all --ipc=host" in command
    assert "-v /opt/deepfleet:/opt/deepfleet:ro lmsysorg/sglang:v0.5.3-cu129" in command
    assert command.endswith("python3 /opt/deepfleet/burnin.py --json")
    assert GPU_01.image is not None and GPU_01.image.startswith("lmsysorg/sglang:")


def test_ssh_uses_pyinfra_connection_data() -> None:
    command = check.ssh_command(LAB, "10.77.0.11", "sh -s")
    assert command[:3] == ["ssh", "-o", "BatchMode=yes"]
    assert "root@10.77.0.11" in command and "StrictHostKeyChecking=no" in command
    assert command[command.index("-i") + 1].endswith(".lab/ssh/id_ed25519")
    remote = check.ssh_command(BAREMETAL, "192.0.2.11", "sh -s")
    assert remote[-2:] == ["ubuntu@192.0.2.11", "sudo -n sh -s"]


def _runner(stdout: str, rc: int = 0, stderr: str = "") -> check.Runner:
    def run(command: list[str], stdin: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, rc, stdout, stderr)

    return run


def test_check_cluster_with_a_fake_ssh() -> None:
    options = check.Options(nodes=("gpu-01",))
    report = check.check_cluster(
        BAREMETAL, options, _runner((FIXTURES / "clock-offset.txt").read_text())
    )
    assert report.exit_code == 1 and report.serving is None
    assert report.to_dict()["nodes"][0]["status"] == "fail"
    unreachable = check.check_cluster(
        BAREMETAL, options, _runner("", 255, "ssh: connect to host 192.0.2.11 port 22: No route")
    )
    assert unreachable.exit_code == 2 and "No route" in unreachable.unreachable["gpu-01"]
    healthy = check.check_cluster(
        BAREMETAL, options, _runner((FIXTURES / "healthy-hgx.txt").read_text())
    )
    assert healthy.exit_code == 0


def test_load_summary_and_verdict() -> None:
    samples = [
        check.LoadSample(ok=True, ttft_s=0.1 * (i + 1), itl_s=[0.01, 0.02], tokens=3)
        for i in range(10)
    ]
    summary = check.summarize_load(samples, duration_s=2.0)
    assert summary.output_tokens_per_s == pytest.approx(15.0)
    assert summary.ttft_s["p50"] == pytest.approx(0.55)
    assert summary.ttft_s["p95"] == pytest.approx(0.955)
    assert check.load_check(summary).status is Status.PASS
    failing = check.summarize_load([*samples, check.LoadSample(ok=False, error="HTTP 503")], 2.0)
    assert "1 of 11 requests failed (HTTP 503)" in check.load_check(failing).message
    slow = check.summarize_load([check.LoadSample(ok=True, ttft_s=30.0, tokens=1)], 1.0)
    assert check.load_check(slow).status is Status.FAIL


def test_bench_serving_output_is_parsed() -> None:
    line = json.dumps(
        {
            "backend": "sglang-oai-chat",
            "completed": 64,
            "num_prompts": 64,
            "duration": 12.5,
            "output_throughput": 327.7,
            "median_ttft_ms": 180.0,
            "p99_ttft_ms": 900.0,
            "median_itl_ms": 21.0,
            "p95_itl_ms": 35.0,
            "p99_itl_ms": 60.0,
        }
    )
    summary = check.parse_bench_serving("progress...\n" + line + "\n")
    assert summary is not None and summary.failed == 0
    assert summary.ttft_s == {"p50": 0.18, "p99": 0.9}
    assert summary.itl_s["p95"] == pytest.approx(0.035)
    assert check.load_check(summary).status is Status.PASS
    assert check.parse_bench_serving("Traceback ...") is None


def test_cli_unknown_node_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(HOSTS / "lab.yaml"), "--node", "gpu-99"]) == 2
    assert "no node named 'gpu-99'" in capsys.readouterr().err


def test_cli_json_and_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake(spec: Any, options: check.Options) -> check.Report:
        return check.check_cluster(
            spec, options, _runner((FIXTURES / "dns-failure.txt").read_text())
        )

    monkeypatch.setattr("infra.commands.check.check_cluster", fake)
    code = main(["check", str(HOSTS / "example-baremetal.yaml"), "--node", "gpu-01", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["status"] == "fail"
    dns = next(c for c in report["nodes"][0]["checks"] if c["name"] == "node.dns")
    assert dns["status"] == "fail"


@pytest.fixture
def standin() -> Any:
    """The lab's SGLang stand-in on a free local port, with an API key."""
    import socket
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "infra.standin.server",
            "--port",
            str(port),
            "--served-model-name",
            "r1-distill-qwen-7b",
            "--api-key",
            "lab-key",
            "--enable-metrics",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_lab_serving_checks_against_the_standin(
    standin: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = check.Endpoint(
        url=f"http://127.0.0.1:{standin}",
        api_key="lab-key",
        model="r1-distill-qwen-7b",
        image=None,
        bench_node="gpu-01",
        model_dir=None,
    )
    monkeypatch.setattr(check, "serving_endpoint", lambda spec: endpoint)
    checks = {c.name: c for c in check.serving_checks(LAB)}
    assert [c.status for c in checks.values()] == [Status.PASS] * 3, checks
    assert "requests (built-in)" in checks["serving.load"].message
    assert "TTFT p50/p95" in checks["serving.load"].message
    wrong = check.Endpoint(**{**endpoint.__dict__, "api_key": "nope"})
    monkeypatch.setattr(check, "serving_endpoint", lambda spec: wrong)
    refused = {c.name: c for c in check.serving_checks(LAB)}
    assert refused["serving.chat"].status is Status.FAIL
    assert "none answered" in refused["serving.load"].message


def test_lab_serving_endpoint_is_the_load_balancer() -> None:
    endpoint = check.serving_endpoint(LAB)
    assert endpoint is not None
    assert endpoint.url == "http://10.77.0.10:8000" and endpoint.model == "r1-distill-qwen-7b"


def test_lab_model_directory_may_be_absent_but_not_in_production() -> None:
    lab = check.expectations(LAB, LAB.node("gpu-02"))
    sections = dict(_sections("lab-gpu-01.txt"))
    sections["model:r1-distill-qwen-7b"] = check.Section(
        "model:r1-distill-qwen-7b", 3, "missing-dir"
    )
    verdict = check.evaluate_node(lab, sections)
    assert verdict.check("model.r1-distill-qwen-7b.files").status is Status.NOT_APPLICABLE
    production = dict(_sections("healthy-hgx.txt"))
    production["model:deepseek-r1"] = check.Section("model:deepseek-r1", 3, "missing-dir")
    failed = _failed(check.evaluate_node(GPU_01, production))
    assert "/data/models/deepseek-r1 does not exist" in failed["model.deepseek-r1.files"]
