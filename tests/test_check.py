"""deepfleet check: parsers and verdicts on captured probe outputs (tests/fixtures/check/), no GPU.

Each fixture is what `probe_script` prints on a node (sections of raw command output); a new
fault is a new fixture file and a row in CASES.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from infra import check
from infra.acceptance import burnin
from infra.acceptance.verdict import Status
from infra.cli import main
from infra.sglang import launches_for_spec
from infra.spec import load_spec
from roles import sglang
from tests.conftest import HOSTS
from tests.fake_pyinfra import run_fake_deploy

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
        "roce.gid_index",
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
    (
        "gid-moved.txt",
        None,
        {"roce.gid_index"},
        "sglang-r1-r1-rank0 started with NCCL_IB_GID_INDEX=3",
    ),
    ("gid-no-address.txt", None, {"roce.gid_index"}, "no RoCE v2 GID with an IPv4 address"),
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


# --- the all-reduce across the nodes of a multi-node replica (--burnin) -------------------------


def test_multi_node_replicas_use_the_engines_network_and_environment() -> None:
    [group] = check.multi_node_replicas(BAREMETAL)  # qwen-32b's one-node replica is not one
    assert (group.label, group.nodes) == ("r1 replica 1", ("gpu-01", "gpu-02"))
    engines = {
        launch.node: launch for launch in launches_for_spec(BAREMETAL) if launch.deployment == "r1"
    }
    # rank 0's --dist-init-addr host: its address on the storage network, where the RDMA is.
    assert engines["gpu-01"].dist_init_addr == "198.51.100.11:5000"
    assert group.master_addr == "198.51.100.11"
    assert group.env == {node: launch.env for node, launch in engines.items()}
    assert group.env["gpu-02"]["NCCL_IB_HCA"] == "=mlx5_0:1,mlx5_1:1"
    assert (group.gpu_model, group.gpus_per_node) == ("H100", 8)
    assert group.rdma == {"gpu-01", "gpu-02"}
    # The engines' GID probe, writing where the all-reduce's container reads.
    for node, launch in engines.items():
        ports = launch.nccl_env_command[launch.nccl_env_command.index("--out") + 2 :]
        assert group.gid_probe[node] == [
            "/usr/local/sbin/deepfleet-nccl-env", "--out", "/opt/deepfleet/nccl.env", *ports
        ]  # fmt: skip
    assert check.multi_node_replicas(LAB) == []  # one node per replica


def test_allreduce_command_is_what_burnin_py_parses() -> None:
    [group] = check.multi_node_replicas(BAREMETAL)
    command = check.allreduce_command(group, "gpu-02", 29511)
    prefix = "mkdir -p /opt/deepfleet && cat > /opt/deepfleet/burnin.py && "
    assert command.startswith(prefix)
    # The engine's own GID probe first (its line to stderr: stdout is the JSON report).
    probe, docker = command.removeprefix(prefix).split(" >&2 && ")
    assert shlex.split(probe) == [
        "/usr/local/sbin/deepfleet-nccl-env",
        "--out",
        "/opt/deepfleet/nccl.env",
        "mlx5_0:1:bond1.12",
        "mlx5_1:1:bond1.12",
    ]
    argv = shlex.split(docker)
    assert argv[:3] == ["docker", "run", "--rm"]
    assert argv[argv.index("--env-file") + 1] == "/opt/deepfleet/nccl.env"
    assert "--device" in argv and argv[argv.index("--device") + 1] == "/dev/infiniband"
    assert "NCCL_SOCKET_IFNAME=bond1.12" in argv and "NCCL_IB_HCA==mlx5_0:1,mlx5_1:1" in argv
    script = argv.index("/opt/deepfleet/burnin.py")
    assert argv[script - 2 : script] == [group.image, "python3"]
    args = burnin.build_parser().parse_args(argv[script + 1 :])
    assert args.allreduce_only and args.json and args.backend == "nccl"
    assert (args.ranks, args.nnodes, args.node_rank) == (8, 2, 1)
    assert (args.master_addr, args.master_port) == ("198.51.100.11", 29511)
    assert burnin.rendezvous_of(args).problems() == []


def _replica_report(rank: int, ok: bool = True) -> str:
    rows = [{"bytes": 1 << 30, "size": "1 GiB", "busbw_gbps": 171.5, "correct": True}]
    allreduce: dict[str, Any] = {"status": "ok", "ranks": 16, "nodes": 2, "node_rank": rank}
    allreduce |= {"results": rows, "peak_busbw_gbps": 171.5}
    if not ok:
        allreduce = {"status": "failed", "reason": "RuntimeError: NCCL error", "ranks": 16}
    errors = [] if ok else ["all-reduce: RuntimeError: NCCL error"]
    return json.dumps(
        {"schema": burnin.SCHEMA, "gpus": [], "errors": errors, "allreduce": allreduce}
    )


def _cluster_runner(
    calls: list[tuple[str, str]], broken: str | None = None, together: int = 2
) -> check.Runner:
    """A fake SSH: the probe, the node burn-in, a free port and the replica's all-reduce.

    The all-reduce answers only once `together` of them are running at the same time, as the
    ranks of real nodes only get past their rendezvous when every node started."""
    addresses = {str(n.address): n.name for n in BAREMETAL.nodes}
    rendezvous = threading.Barrier(together, timeout=5)

    def run(command: list[str], stdin: str, timeout: float) -> subprocess.CompletedProcess[str]:
        node = addresses[command[-2].split("@")[1]]
        remote = command[-1]
        calls.append((node, remote))
        out = ""
        if remote.endswith("sh -s"):
            out = (FIXTURES / "healthy-hgx.txt").read_text()
        elif "--allreduce-only" in remote:
            assert stdin.startswith('"""GPU burn-in')  # burnin.py itself, on stdin
            rendezvous.wait()  # BrokenBarrierError unless every node runs at once
            if node == broken:
                return subprocess.CompletedProcess(command, 255, "", "Connection reset")
            rank = int(re.search(r"--node-rank (\d)", remote).group(1))  # type: ignore[union-attr]
            out = _replica_report(rank)
        elif "burnin.py --json" in remote:
            out = (FIXTURES / "burnin-h100x8.json").read_text()
        elif "socket" in remote:
            out = "29511\n"
        return subprocess.CompletedProcess(command, 0, out, "")

    return run


def test_burnin_runs_the_replica_allreduce_on_every_node_at_once() -> None:
    calls: list[tuple[str, str]] = []
    options = check.Options(burnin=True, serving=False, nodes=("gpu-01", "gpu-02"))
    report = check.check_cluster(BAREMETAL, options, _cluster_runner(calls))
    [replica] = report.replicas
    assert replica.node == "r1 replica 1" and replica.passed, replica.render()
    busbw = replica.check("nccl.allreduce_nodes_busbw")
    assert busbw.status is Status.NOT_APPLICABLE and "reported, not judged" in busbw.message
    assert report.exit_code == 0, [v.render() for v in report.nodes]
    assert report.to_dict()["replicas"][0]["node"] == "r1 replica 1"
    started = [(node, remote) for node, remote in calls if "--allreduce-only" in remote]
    assert sorted(node for node, _ in started) == ["gpu-01", "gpu-02"]
    for node, remote in started:
        rank = "0" if node == "gpu-01" else "1"
        assert f"--node-rank {rank} --master-addr 198.51.100.11 --master-port 29511" in remote
    # Each node's own burn-in first (one at a time), then a port from rank 0's node, then both.
    kinds = [
        "replica" if "--allreduce-only" in r else "own" if "burnin.py" in r else "port"
        for _, r in calls
        if "burnin.py" in r or "socket" in r
    ]
    assert kinds == ["own", "own", "port", "replica", "replica"]
    assert [node for node, r in calls if "socket" in r] == ["gpu-01"]


def test_a_replica_node_that_drops_out_fails_the_replica() -> None:
    options = check.Options(burnin=True, serving=False, nodes=("gpu-01", "gpu-02"))
    report = check.check_cluster(BAREMETAL, options, _cluster_runner([], broken="gpu-02"))
    [failure] = report.replicas[0].failures
    assert "gpu-01 (rank 0): finished; gpu-02: unreachable (192.0.2.12): Connection reset" in (
        failure.message
    )
    assert report.exit_code == 1


def test_the_replica_allreduce_needs_every_node_of_the_replica() -> None:
    options = check.Options(burnin=True, serving=False, nodes=("gpu-01",))
    report = check.check_cluster(BAREMETAL, options, _cluster_runner([], together=1))
    check_ = report.replicas[0].check("nccl.allreduce_nodes")
    assert check_.status is Status.NOT_APPLICABLE
    assert "gpu-02 not selected (use --node gpu-01 --node gpu-02, or no --node)" in check_.message
    without = check.check_cluster(BAREMETAL, check.Options(nodes=("gpu-01",)), _runner(""))
    assert without.replicas == []  # only with --burnin


# --- the deploy's gate: a node that fails its checks keeps its replica out of the LB --------------


def _probe_text(sections: dict[str, check.Section]) -> str:
    return "".join(
        f"{check.SECTION_MARKER} {s.name} {s.rc}\n" + (s.output + "\n" if s.output else "")
        for s in sections.values()
    )


def _healthy_gpu_03() -> str:
    """gpu-03 (4 x L40S, PCIe, qwen-32b replica 1) as the probe sees it when healthy."""
    healthy = _sections("healthy-hgx.txt")
    sections = {name: healthy[name] for name in ("xid", "clock", "dns")}
    smi = "\n".join(f"{i}, NVIDIA L40S, 570.172.08, Enabled, 46068, 0" for i in range(4))
    sections["gpus"] = check.Section("gpus", 0, smi)
    model = "model:r1-distill-qwen-32b"
    sections[model] = check.Section(model, 0, "config-json\nfiles 21")
    sections["engine:qwen-32b:1"] = check.Section("engine:qwen-32b:1", 0, "200")
    text = _probe_text(sections)
    verdict = check.node_ready(BAREMETAL, "gpu-03", text)
    assert verdict.passed, verdict.render()  # the control: this node's replica goes back in
    return text


_GATE_INVENTORY = """
import json
_running = json.dumps({{"Name": "/x", "Image": "sha256:1", "State": {{"Running": {running}}},
    "Config": {{"Image": "img", "Entrypoint": ["/bin/sh"], "Cmd": ["x"]}}, "HostConfig": {{}}}})
_probes = json.loads({probes!r})
_silent = {silent!r}  # hosts whose engine never answers /health_generate
hosts = [
    (f"@fake/{{n}}", {{"fake_delay": 0, "fake_delay_jitter": 0, "fake_responses": {{
        "docker inspect --type container": _running,
        # the NodeHealth fact: infra.check.probe_script(...) names itself in its first comment
        "deepfleet check: read-only probes": _probes.get(n, ""),
        **({{"deepfleet-engine-ready http": {{"stderr": "no answer", "success": False}}}}
           if n in _silent else {{}}),
    }}}})
    for n in ("lb-01", "gpu-01", "gpu-02", "gpu-03")
]
"""
_GATE_DEPLOY = """
import os
from pyinfra import host
from infra.spec import load_spec
from roles import sglang

_spec = load_spec(os.environ["SPEC"])
_node = _spec.node(host.name.split("/")[-1])
if sglang.plan(_spec, _node) is not None:
    sglang.apply(spec=_spec, node=_node)
# What the load_balancer role ends with, once its config is in place.
sglang.hold_back_failed_replicas(_spec, _node, "load_balancer")
"""


def _gate_deploy(
    tmp_path: Path, running: bool, silent: tuple[str, ...] = ()
) -> tuple[list[str], str, int]:
    """The real pyinfra CLI on its fake connector, gate on, every engine's unit changed.
    gpu-01 (r1, rank 0) reports a down RDMA port; gpu-02 and gpu-03 are healthy. Returns the
    load balancer's HAProxy commands, the output and the exit status."""
    probes = {
        "gpu-01": (FIXTURES / "ib-port-down.txt").read_text(),
        "gpu-02": (FIXTURES / "healthy-hgx.txt").read_text(),
        "gpu-03": _healthy_gpu_03(),
    }
    assert check.node_ready(BAREMETAL, "gpu-02", probes["gpu-02"]).passed
    ran = run_fake_deploy(
        tmp_path,
        _GATE_INVENTORY.format(probes=json.dumps(probes), running=running, silent=list(silent)),
        _GATE_DEPLOY,
        {"DEEPFLEET_API_KEY": "gate-test-key", "DEEPFLEET_GATE": None},
    )
    lb = [c for h, c in ran.commands if h == "lb-01" and c.startswith(sglang.HAPROXY_SCRIPT)]
    return lb, ran.text, ran.returncode


@pytest.mark.slow
def test_a_node_failing_the_gate_keeps_its_replica_out_of_the_load_balancer(
    tmp_path: Path,
) -> None:
    """Running engines: each replica is drained, restarted and waited for. r1 fails its gate:
    it is never put back in HAProxy and the deploy fails naming the check, while qwen-32b
    (gpu-03, healthy) goes back in."""
    lb, text, returncode = _gate_deploy(tmp_path, running=True)
    assert lb == [
        f"{sglang.HAPROXY_SCRIPT} drain chat/r1-r1 300",
        # no "ready chat/r1-r1": the gate on gpu-01 failed
        f"{sglang.HAPROXY_SCRIPT} drain chat/qwen-32b-r1 300",
        f"{sglang.HAPROXY_SCRIPT} ready chat/qwen-32b-r1",
        # and once the load balancer's config is in place (a reload would have undone the
        # drain), r1 is drained again
        f"{sglang.HAPROXY_SCRIPT} drain chat/r1-r1",
    ], text[-4000:]
    assert returncode != 0
    assert "gpu-01 failed its acceptance checks and stays out of the load balancer" in text
    assert "ib.mlx5_1/1: mlx5_1/1 is Down/Disabled" in text


@pytest.mark.slow
def test_a_replica_started_in_this_run_that_fails_the_gate_is_held_back(tmp_path: Path) -> None:
    """Engines started for the first time were never drained: HAProxy's health check would
    route to r1 once it answers. Its failing gate drains it, after the load balancer's config
    (which is where a new replica's server appears); qwen-32b, healthy, is put in rotation."""
    lb, text, returncode = _gate_deploy(tmp_path, running=False)
    assert lb == [
        f"{sglang.HAPROXY_SCRIPT} ready chat/qwen-32b-r1",
        f"{sglang.HAPROXY_SCRIPT} drain chat/r1-r1",
    ], text[-4000:]
    assert returncode != 0
    assert "gpu-01 failed its acceptance checks and stays out of the load balancer" in text


@pytest.mark.slow
@pytest.mark.parametrize("running", [True, False], ids=["restarted", "started"])
def test_a_replica_whose_engine_never_answered_is_not_put_in_rotation(
    tmp_path: Path, running: bool
) -> None:
    """gpu-03's engine (qwen-32b) never answers /health_generate: pyinfra drops the host before
    its gate runs. That is no pass: qwen-32b is not put back (restarted) or is drained
    (started), like a replica whose node failed its checks."""
    lb, text, returncode = _gate_deploy(tmp_path, running=running, silent=("gpu-03",))
    h = sglang.HAPROXY_SCRIPT
    if running:
        expected = [
            f"{h} drain chat/r1-r1 300",
            f"{h} drain chat/qwen-32b-r1 300",
            # the load balancer's last step: every replica that did not fully pass
            f"{h} drain chat/qwen-32b-r1",
            f"{h} drain chat/r1-r1",
        ]
    else:
        expected = [f"{h} drain chat/qwen-32b-r1", f"{h} drain chat/r1-r1"]
    assert lb == expected, text[-4000:]
    assert returncode != 0
