"""Role load_balancer: HAProxy's config checked by haproxy itself, and run against stand-ins."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.errors import UserError
from infra.render import HostFile, render
from infra.spec import ClusterSpec, load_spec
from infra.validators import ConfigRejected, check_haproxy, check_host_files
from roles import load_balancer as lb
from roles import sglang
from tests.conftest import EXAMPLE_SPECS, HOSTS, PROJECT

BAREMETAL_TEXT = (HOSTS / "example-baremetal.yaml").read_text()
LAB_TEXT = (HOSTS / "lab.yaml").read_text()
KEY = "sk-test-0123456789abcdef"


def _spec(text: str, tmp_path: Path, name: str = "spec.yaml") -> ClusterSpec:
    path = tmp_path / name
    path.write_text(text)
    return load_spec(path)


def _haproxy_cfg(spec: ClusterSpec, node: str = "lb-01") -> str:
    role = lb.plan(spec, spec.node(node))
    assert role is not None
    return next(f.content for f in role.files if f.path == lb.HAPROXY_CFG)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away self-signed certificate + key, standing in for the TLS SecretRef's PEM."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=api.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    combined = directory / "api.pem"
    combined.write_text(cert.read_text() + key.read_text())
    return combined


def check_with_certificate(host_file: HostFile, pem: Path) -> None:
    """`haproxy -c` needs the certificate to exist: point the node path at a test PEM."""
    check_haproxy(HostFile(host_file.path, host_file.content.replace(lb.TLS_PEM, str(pem))))


# --- rendering ---------------------------------------------------------------------------------


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_haproxy_accepts_the_config_of_every_example(spec_path: Path, pem: Path) -> None:
    spec = load_spec(spec_path)
    checked = 0
    for node in spec.nodes:
        role = lb.plan(spec, node)
        if role is None:
            continue
        for host_file in role.files:
            if host_file.path == lb.HAPROXY_CFG:
                check_with_certificate(host_file, pem)
                checked += 1
    assert checked == len(spec.load_balancer.nodes) if spec.load_balancer else checked == 0


@pytest.mark.validators
def test_haproxy_rejects_a_broken_config() -> None:
    spec = load_spec(HOSTS / "lab.yaml")
    good = _haproxy_cfg(spec)
    for broken in (
        good.replace("balance leastconn", "balance fastest"),
        good.replace("timeout server 3600s", "timeout server forever"),
        good.replace("default_backend chat", "default_backend nowhere"),
    ):
        with pytest.raises(ConfigRejected, match="haproxy"):
            check_haproxy(HostFile(lb.HAPROXY_CFG, broken))


def test_weights_acl_timeouts_and_stats_follow_the_spec() -> None:
    spec = load_spec(HOSTS / "example-baremetal.yaml")
    cfg = _haproxy_cfg(spec)
    servers = re.findall(r"^\s+server (\S+) (\S+) weight (\d+) check", cfg, re.M)
    assert servers == [
        ("r1-r1", "192.0.2.11:30000", "100"),
        ("qwen-32b-r1", "192.0.2.13:30000", "30"),
    ]
    assert "acl allowed_clients src 192.0.2.0/24 203.0.113.0/25\n" in cfg
    assert "tcp-request connection reject unless allowed_clients" in cfg
    assert "balance leastconn" in cfg and "option httpchk GET /health" in cfg
    for kind in ("client", "server", "tunnel"):
        assert f"timeout {kind} 3600s" in cfg
    assert f"bind :443 ssl crt {lb.TLS_PEM}" in cfg
    assert "stats socket /run/haproxy/admin.sock mode 660 level admin" in cfg
    assert "bind 192.0.2.20:8404" in cfg  # stats only on the management address
    assert "acl admins src 192.0.2.0/26" in cfg


def test_timeout_follows_timeout_s(tmp_path: Path) -> None:
    text = LAB_TEXT.replace("  port: 8000\n", "  port: 8000\n  timeout_s: 7200\n", 1)
    cfg = _haproxy_cfg(_spec(text, tmp_path))
    assert "timeout server 7200s" in cfg and "timeout tunnel 7200s" in cfg


def test_embeddings_go_to_the_embedding_deployment(tmp_path: Path, pem: Path) -> None:
    text = (
        BAREMETAL_TEXT.replace(
            "models:\n",
            "models:\n  - name: bge-m3\n    source: BAAI/bge-m3\n    storage: models\n"
            "    path: bge-m3\n",
            1,
        )
        .replace(
            "load_balancer:\n",
            "  - name: embed\n    model: bge-m3\n    replicas: [[storage-gpu]]\n"
            "    image: lmsysorg/sglang:v0.5.23-cu129@sha256:" + "a" * 64 + "\n"
            "    port: 30010\n    embedding: true\n\nload_balancer:\n",
            1,
        )
        .replace(
            "  - name: storage-01\n",
            "  - name: storage-gpu\n    groups: [gpu]\n    address: 192.0.2.14\n"
            "    gpus: {model: L40S, count: 1, memory_gb: 48}\n  - name: storage-01\n",
            1,
        )
    )
    spec = _spec(text, tmp_path)
    cfg = _haproxy_cfg(spec)
    assert "use_backend embeddings if { path_beg /v1/embeddings }" in cfg
    assert "default_backend chat" in cfg
    chat, embeddings = cfg.split("\nbackend chat\n", 1)[1].split("\nbackend embeddings\n", 1)
    assert "server embed-r1 192.0.2.14:30010 weight 100 check" in embeddings
    assert "embed-r1" not in chat and "server r1-r1" in chat
    check_with_certificate(HostFile(lb.HAPROXY_CFG, cfg), pem)


def test_api_key_and_certificate_never_in_rendered_files(tmp_path: Path) -> None:
    for spec_path in EXAMPLE_SPECS:
        spec = load_spec(spec_path)
        for node in spec.nodes:
            role = lb.plan(spec, node)
            if role is None:
                continue
            cfg = next((f.content for f in role.files if f.path == lb.HAPROXY_CFG), "")
            if spec.load_balancer and spec.load_balancer.api_key:
                assert '-m str "Bearer ${DEEPFLEET_API_KEY}"' in cfg
                dropin = next(f for f in role.files if f.path == lb.HAPROXY_DROPIN)
                assert f"EnvironmentFile={lb.HAPROXY_ENV}" in dropin.content
            assert all(f.path not in (lb.HAPROXY_ENV, lb.TLS_PEM) for f in role.files)
            assert any("<secret from" in line for line in role.summary) == bool(
                spec.load_balancer and spec.load_balancer.api_key
            )


def test_pd_disaggregation_needs_smg_and_renders_the_pd_router(tmp_path: Path) -> None:
    text = LAB_TEXT.replace(
        "    api_key: {file: .lab/secrets/api-key}\n\nload_balancer:",
        "    api_key: {file: .lab/secrets/api-key}\n"
        "    disaggregation: {prefill_replicas: [1]}\n\nload_balancer:",
    )
    with pytest.raises(UserError, match="cannot route"):
        lb.plan(_spec(text, tmp_path, "pd.yaml"), load_spec(HOSTS / "lab.yaml").node("lb-01"))
    spec = _spec(
        text.replace("  port: 8000\n", "  port: 8000\n  router: haproxy+smg\n", 1), tmp_path
    )
    role = lb.plan(spec, spec.node("lb-01"))
    assert role is not None
    unit = next(f for f in role.files if f.path == lb.SMG_UNIT).content
    assert "--pd-disaggregation" in unit
    assert "--prefill http://10.77.0.11:30000 8998" in unit
    assert "--decode http://10.77.0.12:30000" in unit
    assert "--api-key ${SMG_API_KEY}" in unit and f"EnvironmentFile={lb.SMG_ENV}" in unit
    cfg = next(f for f in role.files if f.path == lb.HAPROXY_CFG).content
    assert f"server smg 127.0.0.1:{spec.load_balancer.router_port}" in cfg  # type: ignore[union-attr]
    check_haproxy(HostFile(lb.HAPROXY_CFG, cfg))
    # HAProxy does not drain engines behind smg: the rolling restart has no drain steps.
    assert {s.action for s in sglang.rolling_restart_plan(spec)} == {"restart", "wait"}


def test_smg_flags_exist_in_smg(tmp_path: Path) -> None:
    """Every flag deepfleet gives smg is one `smg launch --help` lists (smg is a dev dependency)."""
    beside_python = Path(sys.executable).parent / "smg"
    smg = os.environ.get("DEEPFLEET_SMG") or shutil.which("smg") or str(beside_python)
    assert Path(smg).exists(), "smg is missing: pip install -e '.[dev]'"
    help_text = subprocess.run([smg, "launch", "--help"], capture_output=True, text=True).stdout
    spec = _spec(
        LAB_TEXT.replace("  port: 8000\n", "  port: 8000\n  router: haproxy+smg\n", 1), tmp_path
    )
    for flag in (a for a in lb.smg_args(spec) if a.startswith("--")):
        assert f"{flag} " in help_text or f"{flag}\n" in help_text, flag


def test_keepalived_and_open_webui(tmp_path: Path, pem: Path) -> None:
    text = BAREMETAL_TEXT.replace(
        "  - name: nat-01\n",
        "  - name: lb-02\n    groups: [lb]\n    address: 192.0.2.21\n  - name: nat-01\n",
        1,
    ).replace(
        "  nodes: [lb-01]\n  port: 443\n",
        "  nodes: [lb-01, lb-02]\n  port: 443\n  open_webui: true\n"
        "  vip: {address: 192.0.2.100, interface: eno1}\n",
        1,
    )
    spec = _spec(text, tmp_path)
    one, two = (lb.plan(spec, spec.node(n)) for n in ("lb-01", "lb-02"))
    assert one is not None and two is not None
    conf1 = next(f for f in one.files if f.path == lb.KEEPALIVED_CONF).content
    conf2 = next(f for f in two.files if f.path == lb.KEEPALIVED_CONF).content
    assert "192.0.2.100/24 dev eno1" in conf1 and "priority 150" in conf1
    assert "priority 140" in conf2 and "unicast_peer {\n        192.0.2.20" in conf2
    webui = next(f for f in one.files if f.path == lb.OPEN_WEBUI_UNIT).content
    assert f"OPENAI_API_BASE_URL=http://127.0.0.1:{lb.LOOPBACK_PORT}/v1" in webui
    cfg = next(f for f in one.files if f.path == lb.HAPROXY_CFG).content
    assert f"bind 127.0.0.1:{lb.LOOPBACK_PORT}" in cfg and "127.0.0.0/8" in cfg
    check_with_certificate(HostFile(lb.HAPROXY_CFG, cfg), pem)
    if shutil.which("keepalived"):
        check = tmp_path / "keepalived.conf"
        check.write_text(conf1)
        result = subprocess.run(["keepalived", "-t", "-f", str(check)], capture_output=True)
        assert result.returncode == 0, result.stderr


def test_secret_env_lines_are_quoted_for_systemd() -> None:
    assert lb.systemd_env_line("K", 'a"b$c\\d') == 'K="a\\"b\\$c\\\\d"\n'
    with pytest.raises(UserError):
        lb.systemd_env_line("K", "two\nlines")


# --- HAProxy for real, in front of two stand-ins -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def _post(url: str, key: str | None) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[dict[str, object]]:
    """The lab's rendered haproxy.cfg, run for real with loopback addresses and ports."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed")
    spec = load_spec(HOSTS / "lab.yaml")
    cfg = _haproxy_cfg(spec)
    engines = {"chat-r1": _free_port(), "chat-r2": _free_port()}
    front, stats = _free_port(), _free_port()
    sock = tmp_path / "admin.sock"
    cfg = (
        cfg.replace("    chroot /var/lib/haproxy\n    user haproxy\n    group haproxy\n", "")
        .replace("bind :8000", f"bind 127.0.0.1:{front}")
        .replace("src 10.77.0.0/24", "src 127.0.0.0/8")
        .replace("bind 10.77.0.10:8404", f"bind 127.0.0.1:{stats}")
        .replace("/run/haproxy/admin.sock", str(sock))
        .replace("inter 5s fall 3 rise 2 slowstart 30s", "inter 200ms fall 1 rise 1")
    )
    for name, port in engines.items():
        cfg = re.sub(rf"server {name} \S+", f"server {name} 127.0.0.1:{port}", cfg)
    (tmp_path / "haproxy.cfg").write_text(cfg)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infra.standin.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-key",
                KEY,
                "--served-model-name",
                name,
            ],
            cwd=PROJECT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, port in engines.items()
    ]
    env = {**os.environ, lb.KEY_VARIABLE: KEY}
    procs.append(
        subprocess.Popen(
            ["haproxy", "-f", str(tmp_path / "haproxy.cfg")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    )
    script = tmp_path / "deepfleet-haproxy-server"
    script.write_text(render("sglang/deepfleet-haproxy-server.py.j2", socket=str(sock)))
    try:
        for port in engines.values():
            _wait_http(f"http://127.0.0.1:{port}/health")
        _wait_http(f"http://127.0.0.1:{front}/")
        time.sleep(0.6)  # first health checks
        yield {"url": f"http://127.0.0.1:{front}", "script": script, "sock": sock}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


@pytest.mark.slow
def test_live_haproxy_checks_the_key_and_balances(live: dict[str, object]) -> None:
    url = f"{live['url']}/v1/chat/completions"
    status, body = _post(url, None)
    assert status == 401 and body == {"error": "Unauthorized"}
    assert _post(url, "wrong")[0] == 401
    seen = set()
    for _ in range(6):
        status, body = _post(url, KEY)
        assert status == 200
        seen.add(str(body["model"]))
    assert seen == {"chat-r1", "chat-r2"}


@pytest.mark.slow
def test_live_drain_takes_one_replica_out_and_ready_puts_it_back(live: dict[str, object]) -> None:
    url = f"{live['url']}/v1/chat/completions"
    run = [sys.executable, str(live["script"])]
    drained = subprocess.run([*run, "drain", "chat/chat-r1", "5"], capture_output=True, text=True)
    assert drained.returncode == 0 and "drained" in drained.stdout, drained.stdout
    assert {str(_post(url, KEY)[1]["model"]) for _ in range(6)} == {"chat-r2"}
    assert subprocess.run([*run, "ready", "chat/chat-r1"], capture_output=True).returncode == 0
    assert {str(_post(url, KEY)[1]["model"]) for _ in range(8)} == {"chat-r1", "chat-r2"}
    unknown = subprocess.run([*run, "drain", "chat/chat-r9"], capture_output=True, text=True)
    assert unknown.returncode == 0 and "nothing to drain" in unknown.stdout


def test_drain_script_without_haproxy_is_a_no_op(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text(render("sglang/deepfleet-haproxy-server.py.j2", socket=str(tmp_path / "no")))
    result = subprocess.run(
        [sys.executable, str(script), "drain", "chat/chat-r1", "1"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "nothing to drain" in result.stdout


@pytest.mark.validators
def test_shared_validators_accept_the_lab_load_balancer() -> None:
    spec = load_spec(HOSTS / "lab.yaml")
    role = lb.plan(spec, spec.node("lb-01"))
    assert role is not None
    assert f"check_haproxy:{lb.HAPROXY_CFG}" in check_host_files(role.files)


@pytest.mark.slow
def test_live_show_lists_servers(live: dict[str, object]) -> None:
    shown = subprocess.run(
        [sys.executable, str(live["script"]), "show"], capture_output=True, text=True
    )
    assert shown.returncode == 0
    assert "chat/chat-r1 UP weight=100" in shown.stdout
    assert "chat/chat-r2 UP weight=100" in shown.stdout
