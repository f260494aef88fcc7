"""Role sglang: engine units (checked by systemd), secrets kept out of plans, rolling restarts,
and the engine-container fact that turns a hand-started container into drift."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from facts.engine import (
    container_differences,
    expected_container,
    parse_container,
    parse_image,
)
from infra.drift import WRITE_OP
from infra.plan import plan_cluster, write_plan
from infra.render import HostFile, render
from infra.sglang import launches_for_spec
from infra.spec import ClusterSpec, SecretRef, load_spec
from roles import sglang
from tests.conftest import EXAMPLE_SPECS, HOSTS
from tests.fake_pyinfra import run_fake_deploy

LAB = load_spec(HOSTS / "lab.yaml")
BAREMETAL = load_spec(HOSTS / "example-baremetal.yaml")
SENTINEL = "sk-SENTINEL-must-never-appear-0123456789"


def _units(spec: ClusterSpec) -> list[HostFile]:
    return [
        f
        for node in spec.nodes
        if (role := sglang.plan(spec, node)) is not None
        for f in role.files
        if f.path.endswith(".service")
    ]


def verify_units(units: list[HostFile], root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` in a self-contained root: stub docker and the default targets.

    (A root that links the host's /usr loops on merged-/usr hosts, and docker is not installed
    on build machines; the stubs give verify what it resolves without either.)
    """
    system = root / "etc/systemd/system"
    system.mkdir(parents=True, exist_ok=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    if not (root / "bin").exists():
        (root / "bin").symlink_to("usr/bin")
    docker = root / "usr/bin/docker"
    docker.write_text("#!/bin/sh\n")
    docker.chmod(0o755)
    (system / "docker.service").write_text("[Service]\nExecStart=/usr/bin/docker\n")
    for target in (
        "sysinit.target", "basic.target", "shutdown.target", "network-online.target",
        "multi-user.target", "-.slice", "system.slice", "local-fs.target", "remote-fs.target",
    ):  # fmt: skip
        (system / target).write_text("[Unit]\nDescription=stub\n")
    paths = []
    for unit in units:
        target = root / unit.path.lstrip("/")
        target.write_text(unit.content)
        paths.append(str(target))
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *paths],
        capture_output=True,
        text=True,
        check=False,
    )


# --- units -------------------------------------------------------------------------------------


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_systemd_accepts_every_engine_unit(spec_path: Path, tmp_path: Path) -> None:
    units = _units(load_spec(spec_path))
    assert units
    result = verify_units(units, tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.validators
def test_systemd_rejects_a_broken_unit(tmp_path: Path) -> None:
    unit = _units(LAB)[0]
    for broken in (
        unit.content.replace("Restart=on-failure", "Restart=sometimes"),
        unit.content.replace("ExecStart=/usr/bin/docker", "ExecStart=docker-not-absolute"),
        unit.content.replace("TimeoutStartSec=900", "TimeoutStartSec=soon"),
    ):
        result = verify_units([HostFile(unit.path, broken)], tmp_path)
        assert result.stderr.strip(), "systemd-analyze should complain"


def _exec_start_argv(unit: str) -> list[str]:
    """Read ExecStart back the way systemd does for what we write: continuations joined,
    $$ and %% unescaped, then double-quote/backslash word splitting."""
    text = unit.split("\nExecStart=", 1)[1].split("\nExecStop=", 1)[0]
    text = text.replace(" \\\n    ", " ").replace("$$", "$").replace("%%", "%")
    return shlex.split(text)


@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_exec_start_is_the_builders_docker_run(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for launch in launches_for_spec(spec):
        node = spec.node(launch.node)
        planned = {x.unit_name: x for x in sglang.node_launches(spec, node)}
        unit = sglang.render_unit(spec, planned[launch.unit_name])
        argv = _exec_start_argv(unit.content)
        expected = (
            sglang.lab_container_args(launch.container_args)
            if spec.is_lab
            else launch.container_args
        )
        assert argv == ["/usr/bin/docker", *expected[1:]]
        assert unit.path == f"/etc/systemd/system/{launch.unit_name}.service"
        for line in (
            f"ExecStartPre=-/usr/bin/docker rm -f {launch.unit_name}",
            f"ExecStop=/usr/bin/docker stop -t 30 {launch.unit_name}",
            "Restart=on-failure",
            "StandardOutput=journal",
        ):
            assert line in unit.content
        assert argv[argv.index("--name") + 1] == launch.unit_name
        assert "--rm" in argv


def test_lab_units_drop_gpus_and_production_keeps_them() -> None:
    for unit in _units(LAB):
        assert "--gpus" not in unit.content and "memlock" not in unit.content
        assert "--ulimit stack=67108864" in unit.content
        assert "deepfleet/sglang-standin:0.1.0" in unit.content
    assert sglang.lab_container_args(["docker", "run", "--gpus", "all", "img"]) == [
        "docker", "run", "img",
    ]  # fmt: skip
    for unit in _units(BAREMETAL):
        assert "--gpus all" in unit.content and "--ulimit memlock=-1" in unit.content
    summary = " ".join(sglang.plan(LAB, LAB.node("gpu-01")).summary)  # type: ignore[union-attr]
    assert "no --gpus all" in summary and "stand-in" in summary


def test_systemd_quoting() -> None:
    assert sglang.systemd_quote("--port") == "--port"
    assert sglang.systemd_quote("50%") == '"50%%"'
    assert sglang.systemd_quote('exec a "${K:?x}"') == '"exec a \\"$${K:?x}\\""'


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_secret_never_in_plans(
    spec_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPFLEET_API_KEY", SENTINEL)
    secrets = [SENTINEL]
    lab_key = HOSTS.parent / ".lab/secrets/api-key"
    if lab_key.is_file() and lab_key.read_text().strip():
        secrets.append(lab_key.read_text().strip())
    spec = load_spec(spec_path)
    plans = plan_cluster(spec)
    for node_plan in plans:
        for role in node_plan.roles:
            text = "\n".join([*role.summary, *(f.content for f in role.files)])
            for secret in secrets:
                assert secret not in text, f"{role.role} on {node_plan.node.name} leaks a secret"
    for written in write_plan(plans, tmp_path):
        content = written.read_text()
        assert all(secret not in content for secret in secrets), written
    # The env files with keys are not planned files: the deploy writes them from the SecretRef.
    keyed = {d.name for d in spec.deployments if d.api_key is not None}
    planned = {f.path for p in plans for r in p.roles for f in r.files}
    assert all(f"/etc/deepfleet/{name}.env" not in planned for name in keyed)
    summaries = " ".join(s for p in plans for r in p.roles if r.role == "sglang" for s in r.summary)
    for dep in spec.deployments:
        if dep.api_key is not None:
            assert f"SGLANG_API_KEY=<secret from {dep.api_key.describe()}>" in summaries


def test_resolve_secret_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPFLEET_TEST_KEY", f"  {SENTINEL}\n")
    assert sglang.resolve_secret(SecretRef(env="DEEPFLEET_TEST_KEY")) == SENTINEL
    monkeypatch.delenv("DEEPFLEET_TEST_KEY")
    assert sglang.resolve_secret(SecretRef(env="DEEPFLEET_TEST_KEY")) is None
    (tmp_path / "key").write_text(SENTINEL + "\n")
    assert sglang.resolve_secret(SecretRef(file="key"), base=tmp_path) == SENTINEL
    assert sglang.resolve_secret(SecretRef(file="missing"), base=tmp_path) is None
    assert sglang.env_line("SGLANG_API_KEY", "a b$c") == "SGLANG_API_KEY=a b$c\n"


def test_secret_operations_are_not_file_writes_for_drift() -> None:
    # drift diffs the node's copy of every "[role] Write /path": a secret must never be one.
    name = "[sglang] Install secret /etc/deepfleet/chat.env from file:.lab/secrets/api-key"
    assert WRITE_OP.match(name) is None
    assert WRITE_OP.match("[sglang] Write /etc/systemd/system/sglang-chat-r1.service")


# --- rolling restarts --------------------------------------------------------------------------


def _replicas_out(steps: list[sglang.RollingStep]) -> int:
    out, most = set(), 0
    for step in steps:
        key = (step.deployment, step.replica)
        if step.action in ("drain", "restart"):
            out.add(key)
        elif step.action == "ready" or (step.action == "wait" and not _drains(steps, key)):
            out.discard(key)
        most = max(most, len(out))
    return most


def _drains(steps: list[sglang.RollingStep], key: tuple[str, int]) -> bool:
    return any(s.action == "drain" and (s.deployment, s.replica) == key for s in steps)


def test_one_host_carries_the_order_of_the_rolling_restart() -> None:
    steps = sglang.rolling_restart_plan(load_spec(HOSTS / "example-baremetal.yaml"))
    everyone = {n for s in steps for n in s.commands}
    assert sglang.order_anchor(steps, everyone) == "lb-01"  # it drains every replica
    # --limit without the load balancer: the first engine host in the run carries it.
    assert sglang.order_anchor(steps, everyone - {"lb-01"}) == "gpu-01"
    assert sglang.order_anchor(steps, {"gpu-03"}) == "gpu-03"
    assert sglang.order_anchor(steps, set()) is None


@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_rolling_restart_takes_one_replica_out_at_a_time(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    steps = sglang.rolling_restart_plan(spec)
    assert _replicas_out(steps) == 1
    for dep in spec.deployments:
        for number, replica in enumerate(dep.replicas, start=1):
            mine = [s for s in steps if (s.deployment, s.replica) == (dep.name, number)]
            assert [s.action for s in mine] == ["drain", "restart", "wait", "ready"]
            drain, restart, wait, ready = mine
            assert sorted(restart.commands) == sorted(replica)  # every rank restarts
            assert list(wait.commands) == [replica[0]]  # rank 0 answers /health_generate
            assert sorted(drain.commands) == sorted(spec.load_balancer.nodes)  # type: ignore[union-attr]
            assert sorted(ready.commands) == sorted(drain.commands)
            assert "/health_generate" in wait.commands[replica[0]][0]
            # The next replica is only drained after this one is back.
            after = steps[steps.index(ready) + 1 :]
            before = steps[: steps.index(drain)]
            others = [s for s in steps if s not in mine]
            assert all(s in before or s in after for s in others)


def test_lab_rolling_restart_order() -> None:
    steps = sglang.rolling_restart_plan(LAB)
    assert [(s.action, s.replica, sorted(s.commands)) for s in steps] == [
        ("drain", 1, ["lb-01"]),
        ("restart", 1, ["gpu-01"]),
        ("wait", 1, ["gpu-01"]),
        ("ready", 1, ["lb-01"]),
        ("drain", 2, ["lb-01"]),
        ("restart", 2, ["gpu-02"]),
        ("wait", 2, ["gpu-02"]),
        ("ready", 2, ["lb-01"]),
    ]
    assert steps[0].commands["lb-01"] == [f"{sglang.HAPROXY_SCRIPT} drain chat/chat-r1 300"]
    assert steps[1].commands["gpu-01"] == ["systemctl restart sglang-chat-r1.service"]


def test_multi_node_replica_waits_with_the_dist_timeout() -> None:
    steps = sglang.rolling_restart_plan(BAREMETAL)
    wait = next(s for s in steps if s.deployment == "r1" and s.action == "wait")
    launch = next(x for x in launches_for_spec(BAREMETAL) if x.deployment == "r1")
    timeout = launch.engine_args[launch.engine_args.index("--dist-timeout") + 1]
    assert wait.commands["gpu-01"][0].split()[2] == timeout


def test_ready_script_waits_for_health_generate(tmp_path: Path) -> None:
    answers = iter([503, 503, 200])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(next(answers) if self.path == "/health_generate" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = tmp_path / "ready"
    script.write_text(render("sglang/deepfleet-engine-ready.py.j2", interval=0.05))
    url = f"http://127.0.0.1:{server.server_port}/health_generate"
    try:
        ok = subprocess.run(
            [sys.executable, str(script), url, "10"], capture_output=True, text=True
        )
        assert ok.returncode == 0 and "ready" in ok.stdout
        late = subprocess.run(
            [sys.executable, str(script), url.replace("health_generate", "x"), "0.3"],
            capture_output=True,
            text=True,
        )
        assert late.returncode == 1 and "not ready" in late.stderr
    finally:
        server.shutdown()


# --- the engine container fact -----------------------------------------------------------------


def _inspect(cmd: list[str], image: str = "deepfleet/sglang-standin:0.1.0") -> list[str]:
    return [
        json.dumps(
            {
                "Name": "/sglang-chat-r1",
                "Image": "sha256:" + "1" * 64,
                "State": {"Running": True, "Status": "running"},
                "Config": {"Image": image, "Entrypoint": ["/bin/sh"], "Cmd": cmd},
                "HostConfig": {
                    "NetworkMode": "host",
                    "ShmSize": 32 * 1024**3,
                    "Binds": [
                        "/data/models/deepseek-r1-distill-qwen-7b:/models/deepseek-r1-distill-qwen-7b:ro"
                    ],
                },
            }
        )
    ]


def test_engine_fact_turns_a_hand_started_container_into_drift() -> None:
    launch = sglang.node_launches(LAB, LAB.node("gpu-01"))[0]
    image = "deepfleet/sglang-standin:0.1.0"
    expected = expected_container(launch.container_args, image)
    assert expected.entrypoint == ("/bin/sh",) and expected.network_mode == "host"
    same = parse_container(_inspect(list(expected.command)))
    assert same is not None and same.name == "sglang-chat-r1"
    assert container_differences(same, expected, "sha256:" + "1" * 64) == []
    by_hand = parse_container(_inspect([*expected.command[:-1], expected.command[-1] + " --tp 2"]))
    assert container_differences(by_hand, expected)[0].startswith("engine arguments differ")
    other = parse_container(_inspect(list(expected.command), image="lmsysorg/sglang:latest"))
    assert "image lmsysorg/sglang:latest" in container_differences(other, expected)[0]
    retagged = container_differences(same, expected, "sha256:" + "2" * 64)
    assert retagged and retagged[0].startswith("image ID")
    assert container_differences(None, expected) == []  # absent: the unit starts it
    assert parse_container([""]) is None


def test_image_fact() -> None:
    image = parse_image(['{"Id": "sha256:ab", "RepoTags": ["a:1"], "RepoDigests": []}'])
    assert image is not None and image.id == "sha256:ab" and image.repo_tags == ("a:1",)
    assert parse_image([]) is None


def test_air_gapped_image_tarball_name() -> None:
    image = BAREMETAL.deployments[0].image
    command = sglang.pull_or_load(image)
    assert f"{sglang.IMAGE_CACHE}/lmsysorg_sglang_v0.5" in command
    assert f"docker pull {image}" in command


# --- the real pyinfra CLI, with its fake connector: the order commands run in -------------------

_INVENTORY = """
import json
_running = json.dumps({{"Name": "/x", "Image": "sha256:1", "State": {{"Running": {running}}},
    "Config": {{"Image": "img", "Entrypoint": ["/bin/sh"], "Cmd": ["x"]}}, "HostConfig": {{}}}})
_data = {{"fake_delay": 0, "fake_delay_jitter": 0,
          "fake_responses": {{"docker inspect --type container": _running}}}}
hosts = [(f"@fake/{{n}}", dict(_data)) for n in ("lb-01", "gpu-01", "gpu-02", "gpu-03")]
"""
_DEPLOY = """
import os
from pyinfra import host
from infra.spec import load_spec
from roles import sglang

_spec = load_spec(os.environ["SPEC"])
_node = _spec.node(host.name.split("/")[-1])
if sglang.plan(_spec, _node) is not None:
    sglang.apply(spec=_spec, node=_node)
"""
_ROLLING = (sglang.HAPROXY_SCRIPT, "systemctl restart sglang", sglang.READY_SCRIPT)


def _run_fake_deploy(tmp_path: Path, running: bool) -> list[tuple[str, str]]:
    ran = run_fake_deploy(
        tmp_path,
        _INVENTORY.format(running=running),
        _DEPLOY,
        # Fake hosts answer no health probe; the gate itself is tested on the lab.
        {"DEEPFLEET_API_KEY": SENTINEL, "DEEPFLEET_GATE": "off"},
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert SENTINEL not in ran.text  # the key is uploaded, never printed
    _LAST_OUTPUT[:] = [ran.text]
    return [(h, c) for h, c in ran.commands if c.startswith(_ROLLING)]


_LAST_OUTPUT: list[str] = []


@pytest.mark.slow
def test_no_replica_is_drained_before_every_engine_host_wrote_its_units(tmp_path: Path) -> None:
    """The drain's condition reads whether the replica's unit changed: a drain ordered before
    the engine hosts' unit writes would be skipped and the restart would not be drained."""
    _run_fake_deploy(tmp_path, running=True)
    operations = re.findall(r"^--> Starting operation: (.*)$", _LAST_OUTPUT[0], re.M)
    writes = [i for i, op in enumerate(operations) if "Write /etc/systemd/system/sglang-" in op]
    drains = [i for i, op in enumerate(operations) if "out of the load balancer" in op]
    assert writes and drains
    assert max(writes) < min(drains), [operations[i] for i in (max(writes), min(drains))]


@pytest.mark.slow
def test_pyinfra_runs_one_replica_at_a_time_across_hosts(tmp_path: Path) -> None:
    """Running engines whose unit changed: the LB drains, the ranks restart, rank 0 is waited
    for, the LB puts it back, and only then does the next replica start."""
    commands = _run_fake_deploy(tmp_path, running=True)
    restarts = sorted(commands[1:3])
    assert restarts == [
        ("gpu-01", "systemctl restart sglang-r1-r1-rank0.service"),
        ("gpu-02", "systemctl restart sglang-r1-r1-rank1.service"),
    ]
    assert [commands[0], *restarts, *commands[3:]] == [
        ("lb-01", f"{sglang.HAPROXY_SCRIPT} drain chat/r1-r1 300"),
        ("gpu-01", "systemctl restart sglang-r1-r1-rank0.service"),
        ("gpu-02", "systemctl restart sglang-r1-r1-rank1.service"),
        (
            "gpu-01",
            f"{sglang.READY_SCRIPT} http://127.0.0.1:30000/health_generate 4080 sglang-r1-r1-rank0.service",
        ),
        ("lb-01", f"{sglang.HAPROXY_SCRIPT} ready chat/r1-r1"),
        ("lb-01", f"{sglang.HAPROXY_SCRIPT} drain chat/qwen-32b-r1 300"),
        ("gpu-03", "systemctl restart sglang-qwen-32b-r1.service"),
        (
            "gpu-03",
            f"{sglang.READY_SCRIPT} http://127.0.0.1:30000/health_generate 3600 sglang-qwen-32b-r1.service",
        ),
        ("lb-01", f"{sglang.HAPROXY_SCRIPT} ready chat/qwen-32b-r1"),
    ]


@pytest.mark.slow
def test_pyinfra_first_deploy_starts_everything_and_waits_without_draining(tmp_path: Path) -> None:
    commands = _run_fake_deploy(tmp_path, running=False)
    assert [c for _, c in commands] == [
        f"{sglang.READY_SCRIPT} http://127.0.0.1:30000/health_generate 4080 sglang-r1-r1-rank0.service",
        # Started replicas that passed the gate are put in rotation (nothing drained them; a
        # replica held back by an earlier run comes back here).
        f"{sglang.HAPROXY_SCRIPT} ready chat/r1-r1",
        f"{sglang.READY_SCRIPT} http://127.0.0.1:30000/health_generate 3600 sglang-qwen-32b-r1.service",
        f"{sglang.HAPROXY_SCRIPT} ready chat/qwen-32b-r1",
    ]


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_shared_validators_accept_the_serving_roles(spec_path: Path) -> None:
    from infra.validators import check_host_files

    spec = load_spec(spec_path)
    for node_plan in plan_cluster(spec):
        serving = [
            f
            for role in node_plan.roles
            if role.role in ("sglang", "load_balancer", "nat")
            for f in role.files
        ]
        if any(f.path.endswith((".service", ".cfg", ".nft")) for f in serving):
            assert check_host_files(serving)
