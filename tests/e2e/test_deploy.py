"""End to end on the lab: deploy every role, idempotency, serving through the LB, drift.

Runs before test_lab.py (which restarts and removes nodes): the module deploys once, then each
test reads or briefly disturbs the deployed lab and puts it back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.deploy_results import changed_operations, parse_results
from tests.e2e.conftest import LAB_SPEC, PROJECT, Lab

pytestmark = pytest.mark.lab

BIN = Path(sys.executable).parent
ENV = {**os.environ, "DEEPFLEET_SPEC": str(LAB_SPEC), "PYINFRA_PROGRESS": "off"}
ENDPOINT = "http://10.77.0.10:8000"
MODEL = "r1-distill-qwen-7b"


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, cwd=PROJECT, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as expired:
        # Say where it stopped: the last lines printed name the host and operation.
        output = [part for part in (expired.stderr, expired.stdout) if part]
        tail = "\n".join(
            (part.decode(errors="replace") if isinstance(part, bytes) else part)[-3000:]
            for part in output
        )
        pytest.fail(f"{' '.join(argv)} ran past {timeout:.0f} s; its output ended:\n{tail}")


def pyinfra(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "pyinfra"), *args, "inventory.py", "deploy.py"], timeout)


def deepfleet(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "deepfleet"), *args], timeout)


@pytest.fixture(scope="module")
def deployed(lab: Lab) -> Iterator[Lab]:
    first = pyinfra("-y")
    assert first.returncode == 0, first.stderr[-4000:] + first.stdout[-4000:]
    yield lab


def _api_key() -> str:
    return (PROJECT / ".lab" / "secrets" / "api-key").read_text().strip()


def chat(stream: bool = False, key: str | None = None) -> tuple[int, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    request = urllib.request.Request(
        f"{ENDPOINT}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {key or _api_key()}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def replica_of(text: str) -> str:
    return text.split("host=", 1)[1].split()[0]


def test_second_deploy_changes_nothing(deployed: Lab) -> None:
    second = pyinfra("-y", "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    assert changed_operations(parse_results(second.stdout)) == []


def test_fresh_lab_shows_no_drift(deployed: Lab) -> None:
    result = deepfleet("drift", str(LAB_SPEC))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No drift" in result.stdout


def test_chat_through_the_load_balancer_reaches_both_replicas(deployed: Lab) -> None:
    seen: set[str] = set()
    for _ in range(8):
        status, text = chat()
        assert status == 200, text
        seen.add(replica_of(json.loads(text)["choices"][0]["message"]["content"]))
    assert seen == {"gpu-01", "gpu-02"}
    status, text = chat(stream=True)
    assert status == 200
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2


def test_the_api_key_is_required(deployed: Lab) -> None:
    status, _ = chat(key="wrong")
    assert status == 401


def test_requests_keep_succeeding_with_one_replica_down(deployed: Lab) -> None:
    assert deployed.ssh("gpu-02", "systemctl stop sglang-chat-r2").returncode == 0
    try:
        results = [chat() for _ in range(12)]
        assert all(status == 200 for status, _ in results), results
        assert {replica_of(t) for _, t in results} == {"gpu-01"}
    finally:
        deployed.ssh("gpu-02", "systemctl start sglang-chat-r2")
        _wait_healthy(deployed, "gpu-02", 30000)


def test_a_config_change_rolls_through_with_zero_failed_requests(
    deployed: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """The user's path: change an engine setting, deploy, under a steady request loop; then
    deploy the spec itself again. Both rolling restarts must lose no request."""
    from bench.serving import main as serving

    code = serving(["--config-change", "--requests", "60", "--concurrency", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["during_exit_code"] == 0, report["steps"]
    deploys = [line for line in report["steps"] if "deploy" in line]
    # Each deploy drains and restarts both replicas (one at a time: the role's rolling restart).
    assert len(deploys) == 2, deploys
    assert all(line.endswith("2 replica restart(s), 2 drain(s)") for line in deploys), deploys
    assert report["requests_during"] > 0
    assert report["failed"] == 0, report["errors"]
    assert set(report["served_by"]) == {"gpu-01", "gpu-02"}
    assert code == 0


def _wait_healthy(lab: Lab, node: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.ssh(node, f"curl -fsS localhost:{port}/health").returncode == 0:
            time.sleep(12)  # HAProxy needs `rise 2` checks 5 s apart to route to it again
            return
        time.sleep(1)
    raise AssertionError(f"{node} did not come back")


HAND_CHANGES = {
    "edited chrony.conf": (
        "gpu-01",
        "echo 'server 203.0.113.9 iburst' >> /etc/chrony/chrony.conf",
        "[timesync] Write /etc/chrony/chrony.conf",
    ),
    "edited netplan file": (
        "gpu-02",
        "sed -i 's#10.77.0.12/24#10.77.0.99/24#' /etc/netplan/60-deepfleet.yaml",
        "[netplan] Write /etc/netplan/60-deepfleet.yaml",
    ),
    "stopped engine unit": (
        "gpu-01",
        "systemctl stop sglang-chat-r1",
        "[sglang] Start and enable sglang-chat-r1",
    ),
    "removed package": ("lb-01", "apt-get remove -y -q jq", "[base] Install base packages"),
    "engine with other flags": (
        "gpu-02",
        "systemctl stop sglang-chat-r2 && docker run -d --name sglang-chat-r2 --network host "
        "deepfleet/sglang-standin:0.1.0 python3 -m sglang.launch_server --port 30000 --tp-size 2",
        "running container differs from the spec",
    ),
}


def _report(result: subprocess.CompletedProcess[str], path: Path) -> dict[str, Any]:
    assert path.exists(), result.stdout + result.stderr
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def test_hand_changes_are_named_in_the_drift_report(deployed: Lab, tmp_path: Path) -> None:
    for what, (node, command, _) in HAND_CHANGES.items():
        assert deployed.ssh(node, command).returncode == 0, what
    try:
        out = tmp_path / "drift.json"
        markdown = tmp_path / "drift.md"
        result = deepfleet("drift", str(LAB_SPEC), "--json", str(out), "--markdown", str(markdown))
        assert result.returncode == 3, result.stdout + result.stderr
        hosts = {h["host"]: h for h in _report(result, out)["hosts"]}
        for what, (node, _, expected) in HAND_CHANGES.items():
            assert any(expected in change for change in hosts[node]["changes"]), (what, hosts[node])
        # The hand-started engine is named with what differs (its flags), not only "restart".
        assert any("--tp-size', '2'" in c for c in hosts["gpu-02"]["changes"]), hosts["gpu-02"]
        assert (
            "+server 203.0.113.9 iburst"
            not in hosts["gpu-01"]["file_diffs"]["/etc/chrony/chrony.conf"]
        )
        assert (
            "-server 203.0.113.9 iburst" in hosts["gpu-01"]["file_diffs"]["/etc/chrony/chrony.conf"]
        )
        assert "10.77.0.99/24" in hosts["gpu-02"]["file_diffs"]["/etc/netplan/60-deepfleet.yaml"]
        assert not hosts["infra-01"]["drifted"]
        assert "### gpu-01" in markdown.read_text()
    finally:
        deployed.ssh("gpu-02", "docker rm -f sglang-chat-r2")
        restore = pyinfra("-y")
        assert restore.returncode == 0, restore.stderr[-3000:]
    clean = deepfleet("drift", str(LAB_SPEC))
    assert clean.returncode == 0, clean.stdout


def test_unreachable_node_is_an_error_naming_it(deployed: Lab, tmp_path: Path) -> None:
    # A node the spec names but nothing answers for: the drift check must say it could not
    # look at it (exit 2, named), not report "no drift".
    spec = tmp_path / "lab-plus-ghost.yaml"
    spec.write_text(
        LAB_SPEC.read_text().replace(
            "  - name: infra-01\n",
            "  - name: gpu-09\n    groups: [gpu]\n    address: 10.77.0.99\n  - name: infra-01\n",
            1,
        )
    )
    result = deepfleet("drift", str(spec))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "gpu-09" in result.stderr and "unreachable" in result.stderr


def test_prometheus_scrapes_every_target(deployed: Lab) -> None:
    deadline = time.monotonic() + 90
    targets: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen("http://10.77.0.20:9090/api/v1/targets", timeout=10) as r:
            targets = json.loads(r.read())["data"]["activeTargets"]
        if targets and all(t["health"] == "up" for t in targets):
            break
        time.sleep(5)
    jobs = {t["labels"]["job"] for t in targets}
    assert {t["scrapeUrl"]: t["health"] for t in targets if t["health"] != "up"} == {}
    # node_exporter on all four nodes, both engines and HAProxy.
    assert len([t for t in targets if "9100" in t["scrapeUrl"]]) == 4
    assert len(targets) >= 7, jobs


def test_acceptance_check_passes_and_gpu_checks_are_not_applicable(deployed: Lab) -> None:
    result = deepfleet("check", str(LAB_SPEC), "--json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    text = json.dumps(report)
    assert "not-applicable" in text and '"fail"' not in text
