"""Role load_balancer: HAProxy's config checked by haproxy itself, and run against stand-ins."""

from __future__ import annotations

import contextlib
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

from infra.cli import main
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


def _backend_servers(cfg: str) -> dict[str, list[str]]:
    """Each HAProxy backend of a rendered config and the names of its servers."""
    result: dict[str, list[str]] = {}
    for block in cfg.split("\nbackend ")[1:]:
        name, _, body = block.partition("\n")
        result[name] = re.findall(r"^\s+server (\S+) ", body.split("\nfrontend ")[0], re.M)
    return result


def _two_models(text: str = LAB_TEXT) -> str:
    """The lab with two chat models: `chat` (r1-distill-qwen-7b) on gpu-01, `other` on gpu-02."""
    return text.replace(
        "models:\n",
        "models:\n  - name: other-model\n    source: Qwen/Qwen2.5-7B-Instruct\n"
        "    storage: models\n    path: qwen2.5-7b-instruct\n",
        1,
    ).replace(
        "    replicas: [[gpu-01], [gpu-02]]\n"
        "    parallelism: {tp: 1}\n"
        "    image: deepfleet/sglang-standin:0.1.0\n"
        "    port: 30000\n"
        "    api_key: {file: .lab/secrets/api-key}\n",
        "    replicas: [[gpu-01]]\n"
        "    parallelism: {tp: 1}\n"
        "    image: deepfleet/sglang-standin:0.1.0\n"
        "    port: 30000\n"
        "    api_key: {file: .lab/secrets/api-key}\n"
        "  - name: other\n"
        "    model: other-model\n"
        "    replicas: [[gpu-02]]\n"
        "    parallelism: {tp: 1}\n"
        "    image: deepfleet/sglang-standin:0.1.0\n"
        "    port: 30000\n"
        "    api_key: {file: .lab/secrets/api-key}\n",
        1,
    )


def _with_router(text: str, router: str) -> str:
    return text.replace("  port: 8000\n", f"  port: 8000\n  router: {router}\n", 1)


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


def _with_embeddings(text: str) -> str:
    """The bare-metal example plus an embedding deployment (bge-m3) on a fourth GPU node."""
    return (
        text.replace(
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


def test_embeddings_go_to_the_embedding_deployment(tmp_path: Path, pem: Path) -> None:
    spec = _spec(_with_embeddings(BAREMETAL_TEXT), tmp_path)
    cfg = _haproxy_cfg(spec)
    assert "use_backend embeddings if { path_beg /v1/embeddings }" in cfg
    assert "default_backend chat-deepseek-r1" in cfg
    assert _backend_servers(cfg) == {
        "chat-deepseek-r1": ["r1-r1"],
        "chat-r1-distill-qwen-32b": ["qwen-32b-r1"],
        "embeddings": ["embed-r1"],
    }
    assert "server embed-r1 192.0.2.14:30010 weight 100 check" in cfg
    # GET /v1/models, answered by HAProxy, lists the embedding model too.
    assert '"id": "bge-m3"' in cfg.split("if METH_GET { path /v1/models }")[0].splitlines()[-1]
    check_with_certificate(HostFile(lb.HAPROXY_CFG, cfg), pem)


def test_each_chat_model_gets_its_own_backend_chosen_by_the_model_field(pem: Path) -> None:
    """The audit's bug: r1 and the 32B distill shared one leastconn pool, so requests for
    deepseek-r1 were answered by the distill. Each model's servers are now in a backend that only
    requests naming that model reach."""
    spec = load_spec(HOSTS / "example-baremetal.yaml")
    cfg = _haproxy_cfg(spec)
    assert _backend_servers(cfg) == {
        "chat-deepseek-r1": ["r1-r1"],
        "chat-r1-distill-qwen-32b": ["qwen-32b-r1"],
    }
    assert "req.body,json_query('$.model')" in cfg and "option http-buffer-request" in cfg
    assert f"tune.bufsize {lb.BODY_BUFFER_BYTES}" in cfg
    uses = re.findall(r"^\s+use_backend (\S+) if (.+)$", cfg, re.M)
    assert uses == [
        ("chat-deepseek-r1", "METH_POST chat_api { var(txn.model) -m str deepseek-r1 }"),
        (
            "chat-r1-distill-qwen-32b",
            "METH_POST chat_api { var(txn.model) -m str r1-distill-qwen-32b }",
        ),
    ]
    assert "acl chat_api path /v1/chat/completions /v1/completions" in cfg
    # An unknown or missing model is answered before any use_backend: never the default pool.
    assert "status 404" in cfg and "status 400" in cfg
    assert cfg.index("status 404") < cfg.index("use_backend")
    check_with_certificate(HostFile(lb.HAPROXY_CFG, cfg), pem)


def test_one_chat_model_keeps_routing_everything_to_it() -> None:
    """One model per kind: no body buffering, no model check, the backend names stay `chat`."""
    cfg = _haproxy_cfg(load_spec(HOSTS / "lab.yaml"))
    assert _backend_servers(cfg) == {"chat": ["chat-r1", "chat-r2"]}
    assert "json_query" not in cfg and "http-buffer-request" not in cfg
    assert "tune.bufsize" not in cfg and "/v1/models" not in cfg
    assert "default_backend chat\n" in cfg


def test_deployments_of_one_model_share_its_backend(tmp_path: Path) -> None:
    """Two deployments serving the same model: either answers correctly, so they share a pool
    and their weights set the shares."""
    text = _two_models().replace("    model: other-model\n", "    model: r1-distill-qwen-7b\n")
    cfg = _haproxy_cfg(_spec(text, tmp_path))
    assert _backend_servers(cfg) == {"chat": ["chat-r1", "other-r1"]}
    assert "json_query" not in cfg


def test_drain_targets_name_servers_haproxy_has(tmp_path: Path) -> None:
    """Server names stay unique across backends: a rolling restart's `B/S` drain target names
    a server of the rendered config (the drain helper needs the backend too: see the live test)."""
    for text in (LAB_TEXT, _two_models(), _with_embeddings(BAREMETAL_TEXT)):
        spec = _spec(text, tmp_path)
        servers = [s for names in _backend_servers(_haproxy_cfg(spec)).values() for s in names]
        assert len(servers) == len(set(servers))
        targets = [
            command.split()[2]
            for step in sglang.rolling_restart_plan(spec)
            if step.action == "drain"
            for command in step.commands["lb-01"]
        ]
        assert targets and all(t.split("/")[1] in servers for t in targets)


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
    with pytest.raises(UserError, match="problem") as refused:
        _spec(text, tmp_path, "pd.yaml")  # `deepfleet validate` refuses it: nothing is deployed
    assert [p.path for p in refused.value.problems] == ["load_balancer.router"]
    assert "only the smg router can pair" in refused.value.problems[0].message
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
    for flag in (a for a in lb.smg_args(spec, spec.node("lb-01")) if a.startswith("--")):
        assert f"{flag} " in help_text or f"{flag}\n" in help_text, flag


def _lab_with_embeddings(router: str) -> str:
    """The lab with one chat replica (gpu-01), bge-m3 embeddings on gpu-02, and `router`."""
    text = LAB_TEXT.replace(
        "models:\n",
        "models:\n  - name: bge-m3\n    source: BAAI/bge-m3\n    storage: models\n"
        "    path: bge-m3\n",
        1,
    ).replace(
        "    replicas: [[gpu-01], [gpu-02]]\n",
        "    replicas: [[gpu-01]]\n",
        1,
    )
    text = text.replace(
        "\nload_balancer:\n",
        "  - name: embed\n    model: bge-m3\n    replicas: [[gpu-02]]\n"
        "    parallelism: {tp: 1}\n    image: deepfleet/sglang-standin:0.1.0\n"
        "    port: 30010\n    embedding: true\n\nload_balancer:\n",
        1,
    )
    return _with_router(text, router)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (_with_router(_two_models(), "haproxy+smg"), "smg does not route by model"),
        (_with_router(_two_models(), "smg"), "smg does not route by model"),
        (_lab_with_embeddings("smg"), "nothing sends /v1/embeddings"),
    ],
    ids=["haproxy+smg-two-models", "smg-two-models", "smg-embeddings"],
)
def test_routers_that_cannot_serve_the_deployments_are_rejected(
    text: str, error: str, tmp_path: Path
) -> None:
    # A spec rule: `deepfleet validate` names it with the file and line, before any host.
    with pytest.raises(UserError, match="problem") as caught:
        _spec(text, tmp_path)
    assert [p.path for p in caught.value.problems] == ["load_balancer.router"]
    assert error in caught.value.problems[0].message and caught.value.problems[0].hint
    assert caught.value.problems[0].line is not None


def test_validate_refuses_a_router_that_cannot_serve_the_deployments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The router rules are spec rules: `deepfleet validate` reports them (exit 2, file and
    line), not only a deploy's plan."""
    path = tmp_path / "two-models.yaml"
    path.write_text(_with_router(_two_models(), "smg"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "smg does not route by model" in err and "Traceback" not in err
    assert f"{path}:" in err and "hint: set load_balancer.router: haproxy" in err
    # Prefill/decode pairs and plain workers of the same model: smg routes one kind or the other.
    mixed = _with_router(LAB_TEXT, "haproxy+smg").replace(
        "    api_key: {file: .lab/secrets/api-key}\n\nload_balancer:",
        "    api_key: {file: .lab/secrets/api-key}\n"
        "    disaggregation: {prefill_replicas: [1]}\n"
        "  - name: plain\n    model: r1-distill-qwen-7b\n    replicas: [[gpu-01]]\n"
        "    parallelism: {tp: 1}\n    image: deepfleet/sglang-standin:0.1.0\n"
        "    port: 30010\n\nload_balancer:",
    )
    with pytest.raises(UserError, match="problem") as caught:
        _spec(mixed, tmp_path, "mixed.yaml")
    # (The lab has two GPU nodes, so `plain` also shares one: those problems are other rules'.)
    [problem] = [p for p in caught.value.problems if "prefill/decode pairs" in p.message]
    assert problem.path == "deployments[1]" and problem.hint


@pytest.mark.validators
def test_haproxy_smg_sends_embeddings_to_their_engines_and_chat_to_smg(tmp_path: Path) -> None:
    """Embeddings stay reachable behind haproxy+smg: smg gets the chat workers only."""
    spec = _spec(_lab_with_embeddings("haproxy+smg"), tmp_path)
    role = lb.plan(spec, spec.node("lb-01"))
    assert role is not None
    cfg = next(f for f in role.files if f.path == lb.HAPROXY_CFG).content
    assert _backend_servers(cfg) == {"chat": ["smg"], "embeddings": ["embed-r1"]}
    assert "use_backend embeddings if { path_beg /v1/embeddings }" in cfg
    args = lb.smg_args(spec, spec.node("lb-01"))
    workers = args[args.index("--worker-urls") + 1 : args.index("--worker-startup-timeout-secs")]
    assert workers == ["http://10.77.0.11:30000"]
    assert "server embed-r1 10.77.0.12:30010 weight 100 check" in cfg
    check_haproxy(HostFile(lb.HAPROXY_CFG, cfg))
    # HAProxy balances the embedding replicas, so a rolling restart drains them there; smg
    # balances the chat workers itself.
    drained = {d.name: sglang.haproxy_drains(spec, d) for d in spec.deployments}
    assert drained == {"chat": False, "embed": True}


@pytest.mark.validators
@pytest.mark.parametrize("router", ["haproxy+smg", "smg"])
def test_smg_and_open_webui_units_pass_the_real_tools(router: str, tmp_path: Path) -> None:
    """The smg unit (its program stubbed as a node program) and Open WebUI's unit through
    systemd-analyze verify, HAProxy's config through haproxy -c, as the golden files are."""
    text = _with_router(LAB_TEXT, router).replace(
        "  allowed_cidrs: [10.77.0.0/24]\n", "  allowed_cidrs: [10.77.0.0/24]\n  open_webui: true\n"
    )
    spec = _spec(text, tmp_path)
    role = lb.plan(spec, spec.node("lb-01"))
    assert role is not None
    ran = check_host_files(role.files)
    assert "check_systemd_units:/etc/systemd/system/*.service" in ran
    assert {f.path for f in role.files} >= {lb.SMG_UNIT, lb.OPEN_WEBUI_UNIT}
    assert (f"check_haproxy:{lb.HAPROXY_CFG}" in ran) == (router == "haproxy+smg")
    unit = next(f for f in role.files if f.path == lb.SMG_UNIT).content
    assert f"ExecStart={lb.SMG_VENV}/bin/smg launch" in unit
    webui = next(f for f in role.files if f.path == lb.OPEN_WEBUI_UNIT).content
    assert f"After=docker.service network-online.target {lb.edge_service(spec)}" in webui


def test_open_webui_calls_the_api_where_it_listens(tmp_path: Path) -> None:
    tls = "  port: 8000\n  tls: {certificate: {file: /etc/deepfleet/tls/api.pem}}\n"
    on = "  allowed_cidrs: [10.77.0.0/24]\n  open_webui: true\n"
    text = LAB_TEXT.replace("  allowed_cidrs: [10.77.0.0/24]\n", on)
    # HAProxy with TLS: its plain loopback port, which it binds only then.
    spec = _spec(_with_router(text, "haproxy+smg").replace("  port: 8000\n", tls, 1), tmp_path)
    assert lb.open_webui_upstream(spec) == f"http://127.0.0.1:{lb.LOOPBACK_PORT}/v1"
    assert f"bind 127.0.0.1:{lb.LOOPBACK_PORT}\n" in _haproxy_cfg(spec)
    # smg as the edge without TLS: smg itself, on every address.
    spec = _spec(_with_router(text, "smg"), tmp_path)
    assert lb.open_webui_upstream(spec) == "http://127.0.0.1:8000/v1"
    assert "--host 0.0.0.0 --port 8000" in " ".join(lb.smg_args(spec, spec.node("lb-01")))
    # smg as the edge with TLS has no plain listener: an error, not a dead upstream.
    with pytest.raises(UserError, match="problem") as caught:
        _spec(_with_router(text, "smg").replace("  port: 8000\n", tls, 1), tmp_path)
    assert [p.path for p in caught.value.problems] == ["load_balancer.open_webui"]


def test_keepalived_tracks_the_service_that_serves_the_api(tmp_path: Path) -> None:
    vip = "  port: 8000\n  vip: {address: 10.77.0.100, interface: host0}\n"
    for router, unit in (("haproxy", "haproxy.service"), ("smg", "deepfleet-smg.service")):
        spec = _spec(_with_router(LAB_TEXT, router).replace("  port: 8000\n", vip, 1), tmp_path)
        role = lb.plan(spec, spec.node("lb-01"))
        assert role is not None
        conf = next(f for f in role.files if f.path == lb.KEEPALIVED_CONF).content
        assert f'script "/usr/bin/systemctl is-active --quiet {unit}"' in conf


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
    assert "is-active --quiet haproxy.service" in conf1
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


def _post(
    url: str, key: str | None, payload: dict[str, object] | None = None
) -> tuple[int, dict[str, object]]:
    if payload is None:
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"{}")
        except ValueError:  # HAProxy's own HTML pages (503: no server available)
            return error.code, {"html": text.decode(errors="replace")}


@contextlib.contextmanager
def _haproxy_in_front_of_standins(
    tmp_path: Path, cfg: str, engines: dict[str, str]
) -> Iterator[dict[str, object]]:
    """Run a rendered lab haproxy.cfg for real on loopback, one stand-in engine per server:
    `engines` maps a server name to the model name that stand-in serves (and puts in replies)."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed")
    ports = {name: _free_port() for name in engines}
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
    for name, port in ports.items():
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
                str(ports[name]),
                "--api-key",
                KEY,
                "--served-model-name",
                served,
            ],
            cwd=PROJECT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, served in engines.items()
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
        for port in ports.values():
            _wait_http(f"http://127.0.0.1:{port}/health")
        _wait_http(f"http://127.0.0.1:{front}/")
        time.sleep(0.6)  # first health checks
        yield {"url": f"http://127.0.0.1:{front}", "script": script, "sock": sock}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[dict[str, object]]:
    """The lab's rendered haproxy.cfg in front of two stand-ins named after their servers."""
    cfg = _haproxy_cfg(load_spec(HOSTS / "lab.yaml"))
    engines = {"chat-r1": "chat-r1", "chat-r2": "chat-r2"}
    with _haproxy_in_front_of_standins(tmp_path, cfg, engines) as running:
        yield running


@pytest.fixture
def two_models(tmp_path: Path) -> Iterator[dict[str, object]]:
    """The two-model lab (`chat` serves r1-distill-qwen-7b, `other` serves other-model),
    rendered and run for real: each stand-in serves, and answers as, its deployment's model."""
    spec = _spec(_two_models(), tmp_path)
    cfg = _haproxy_cfg(spec)
    engines = {"chat-r1": "r1-distill-qwen-7b", "other-r1": "other-model"}
    with _haproxy_in_front_of_standins(tmp_path, cfg, engines) as running:
        yield {**running, "spec": spec}


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


def _chat(model: str | None, content: str = "hi", *, model_last: bool = False) -> dict[str, object]:
    messages = [{"role": "user", "content": content}]
    if model is None:
        return {"messages": messages}
    # The OpenAI SDKs put `model` after `messages`; HAProxy must read past a long prompt.
    return (
        {"messages": messages, "model": model}
        if model_last
        else {"model": model, "messages": messages}
    )


@pytest.mark.slow
def test_live_a_request_for_one_model_never_reaches_another(two_models: dict[str, object]) -> None:
    url = f"{two_models['url']}/v1/chat/completions"
    for model in ("r1-distill-qwen-7b", "other-model") * 4:
        status, body = _post(url, KEY, _chat(model))
        assert (status, body["model"]) == (200, model)
    # Past the default 16 KiB buffer, after the messages: still read, still routed.
    long_prompt = "x" * 300_000
    for model in ("r1-distill-qwen-7b", "other-model"):
        status, body = _post(url, KEY, _chat(model, long_prompt, model_last=True))
        assert (status, body["model"]) == (200, model)


@pytest.mark.slow
def test_live_unknown_or_missing_model_is_refused_naming_the_models(
    two_models: dict[str, object],
) -> None:
    url = f"{two_models['url']}/v1/chat/completions"
    assert _post(url, None, _chat("other-model"))[0] == 401  # the key check still comes first
    status, body = _post(url, KEY, _chat('deepseek-"r1'))
    error = body["error"]
    assert status == 404 and isinstance(error, dict) and error["code"] == "model_not_found"
    # The name is JSON-escaped into the reply: a quote in it cannot break the JSON.
    assert error["message"] == (
        'model "deepseek-"r1" is not served here; this endpoint serves '
        "r1-distill-qwen-7b, other-model"
    )
    # /v1/completions is routed by model too (the stand-in has no /v1/completions of its own).
    completions = f"{two_models['url']}/v1/completions"
    status, body = _post(completions, KEY, {"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and "other-model" in json.dumps(body)
    status, body = _post(url, KEY, _chat(None))
    error = body["error"]
    assert status == 400 and isinstance(error, dict)
    assert "names no model" in str(error["message"]) and "other-model" in str(error["message"])
    request = urllib.request.Request(
        f"{two_models['url']}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        listed = json.loads(response.read())
    assert [m["id"] for m in listed["data"]] == ["r1-distill-qwen-7b", "other-model"]


def _set_state(sock: object, target: str, state: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(sock))
        conn.sendall(f"set server {target} state {state}\n".encode())
        return conn.recv(4096).decode()


@pytest.mark.slow
def test_live_a_drained_model_is_unavailable_not_answered_by_another(
    two_models: dict[str, object],
) -> None:
    """The audit's worst case: while r1 was drained, every request for it went to the distill."""
    url = f"{two_models['url']}/v1/chat/completions"
    assert _set_state(two_models["sock"], "chat-r1-distill-qwen-7b/chat-r1", "drain").strip() == ""
    for _ in range(4):
        status, body = _post(url, KEY, _chat("r1-distill-qwen-7b"))
        assert status == 503 and "No server is available" in str(body["html"])
        status, body = _post(url, KEY, _chat("other-model"))
        assert (status, body["model"]) == (200, "other-model")
    _set_state(two_models["sock"], "chat-r1-distill-qwen-7b/chat-r1", "ready")
    status, body = _post(url, KEY, _chat("r1-distill-qwen-7b"))
    assert (status, body["model"]) == (200, "r1-distill-qwen-7b")


@pytest.mark.slow
def test_live_rolling_restart_drain_targets_reach_per_model_backends(
    two_models: dict[str, object],
) -> None:
    run = [sys.executable, str(two_models["script"])]
    spec = two_models["spec"]
    assert isinstance(spec, ClusterSpec)
    drains = [s for s in sglang.rolling_restart_plan(spec) if s.action == "drain"]
    assert len(drains) == 2
    for step in drains:
        target = step.commands["lb-01"][0].split()[2]
        drained = subprocess.run([*run, "drain", target, "2"], capture_output=True, text=True)
        assert "drained" in drained.stdout, drained.stdout
        subprocess.run([*run, "ready", target], capture_output=True, check=True)
