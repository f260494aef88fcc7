"""The lab's SGLang stand-in: its HTTP surface, its command line and its image archive.

Fast tests run the server in-process (port 0) or as ``python3 -m sglang.launch_server`` through
the same shim the image carries. The slow test builds the real image with mmdebstrap (root),
checks the archive, and runs the extracted rootfs with chroot over loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.standin import image, server

KEY = "lab-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
PRODUCTION_FLAGS = [
    "--model-path", "/models/DeepSeek-R1", "--tp", "8", "--trust-remote-code",
    "--host", "127.0.0.1", "--nnodes", "1", "--node-rank", "0",
    "--dist-init-addr", "10.0.0.1:5000", "--mem-fraction-static", "0.85",
    "--dist-timeout", "3600", "--context-length=65536", "--enable-torch-compile",
    "--kv-cache-dtype", "fp8_e5m2", "--quantization", "fp8", "--dp", "1",
]  # fmt: skip


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def running(*flags: str, hostname: str = "node-a") -> Iterator[server.StandinServer]:
    """An in-process stand-in on 127.0.0.1 and a free port."""
    config = server.parse_args(["--host", "127.0.0.1", "--port", "0", *flags])
    srv = server.serve(config, hostname=hostname)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def chat(port: int, content: str = "hello stand-in", **extra: Any) -> dict[str, Any]:
    status, _, body = request(
        port,
        "POST",
        "/v1/chat/completions",
        {"model": "x", "messages": [{"role": "user", "content": content}], **extra},
        AUTH,
    )
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def sse_events(body: bytes) -> list[str]:
    """The payloads of ``data:`` lines, in order."""
    return [
        line.removeprefix("data: ")
        for line in body.decode().split("\n\n")
        if line.startswith("data: ")
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if request(port, "GET", "/health")[0] == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"stand-in on port {port} never became healthy")


# --------------------------------------------------------------------------- command line


def test_production_command_line_is_accepted_and_unknown_flags_ignored() -> None:
    config = server.parse_args([*PRODUCTION_FLAGS, "--port", "30000", "--api-key", KEY])
    assert config.model_path == "/models/DeepSeek-R1"
    assert config.served_model_name == "/models/DeepSeek-R1"  # SGLang's default too
    assert config.tp_size == 8  # --tp abbreviates --tp-size, as in SGLang
    assert (config.port, config.host, config.api_key) == (30000, "127.0.0.1", KEY)
    assert "--trust-remote-code" in config.ignored
    assert "--context-length=65536" in config.ignored
    assert "--dist-init-addr" in config.ignored
    assert "--kv-cache-dtype" in config.ignored and "fp8_e5m2" in config.ignored
    assert config.dp_size == 1  # --dp abbreviates --dp-size


def test_known_flags_parse() -> None:
    config = server.parse_args(
        [
            "--model-path=/models/bge-m3", "--served-model-name", "bge-m3", "--tp-size", "2",
            "--dp-size", "4", "--nnodes", "2", "--node-rank", "1", "--enable-metrics",
            "--disaggregation-mode", "prefill", "--is-embedding", "--startup-delay", "1.5",
        ]
    )  # fmt: skip
    assert config.served_model_name == "bge-m3"
    assert (config.tp_size, config.dp_size, config.nnodes, config.node_rank) == (2, 4, 2, 1)
    assert config.enable_metrics and config.is_embedding
    assert config.disaggregation_mode == "prefill"
    assert config.startup_delay == 1.5
    assert not config.serves_api
    assert config.ignored == ()


def test_startup_delay_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(server.STARTUP_DELAY_ENV, "2.5")
    assert server.parse_args([]).startup_delay == 2.5
    assert server.parse_args(["--startup-delay", "0"]).startup_delay == 0


# --------------------------------------------------------------------------- endpoints


def test_health_and_health_generate() -> None:
    with running() as srv:
        for path in ("/health", "/health_generate"):
            status, headers, _ = request(srv.bound_port, "GET", path)
            assert status == 200
            assert headers["Server"].startswith(server.NAME)


def test_models_lists_served_name() -> None:
    with running("--served-model-name", "deepseek-r1", "--api-key", KEY) as srv:
        status, _, body = request(srv.bound_port, "GET", "/v1/models", headers=AUTH)
    assert status == 200
    listing = json.loads(body)
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["deepseek-r1"]
    assert listing["data"][0]["owned_by"] == server.NAME


def test_api_key_required_except_health_and_metrics() -> None:
    with running("--api-key", KEY, "--enable-metrics") as srv:
        port = srv.bound_port
        assert request(port, "GET", "/v1/models")[0] == 401
        assert request(port, "GET", "/v1/models", headers={"Authorization": "Bearer no"})[0] == 401
        status, _, body = request(port, "POST", "/v1/chat/completions", {"messages": []})
        assert (status, json.loads(body)) == (401, {"error": "Unauthorized"})
        assert request(port, "GET", "/get_server_info")[0] == 401
        assert request(port, "GET", "/health")[0] == 200
        assert request(port, "GET", "/health_generate")[0] == 200
        assert request(port, "GET", "/metrics")[0] == 200


def test_chat_completion_is_deterministic_and_names_the_replica() -> None:
    with running("--served-model-name", "deepseek-r1", hostname="gpu-node-7") as srv:
        first = chat(srv.bound_port)
        second = chat(srv.bound_port)
    text = first["choices"][0]["message"]["content"]
    assert text == second["choices"][0]["message"]["content"]
    assert "host=gpu-node-7" in text
    assert f"port={srv.bound_port}" in text
    assert "hello stand-in" in text
    assert first["object"] == "chat.completion"
    assert first["model"] == "deepseek-r1"
    assert first["choices"][0]["finish_reason"] == "stop"
    usage = first["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_truncates_with_finish_reason_length() -> None:
    with running() as srv:
        reply = chat(srv.bound_port, max_tokens=3)
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3


def test_streaming_gives_sse_chunks_ending_with_done() -> None:
    with running() as srv:
        whole = chat(srv.bound_port)["choices"][0]["message"]["content"]
        status, headers, body = request(
            srv.bound_port,
            "POST",
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hello stand-in"}],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == whole
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 3


def test_bad_requests_are_answered_400() -> None:
    with running() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.bound_port, timeout=5)
        conn.request("POST", "/v1/chat/completions", body=b"{not json")
        response = conn.getresponse()
        assert response.status == 400
        assert json.loads(response.read())["object"] == "error"
        conn.close()
        assert request(srv.bound_port, "POST", "/v1/chat/completions", {"messages": []})[0] == 400
        assert request(srv.bound_port, "POST", "/v1/embeddings", {"input": "x"})[0] == 400
        assert request(srv.bound_port, "GET", "/no/such/path")[0] == 404


def test_keep_alive_connection_serves_several_requests() -> None:
    with running() as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.bound_port, timeout=5)
        for _ in range(3):
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        conn.close()


def test_embeddings_are_deterministic_unit_vectors() -> None:
    with running("--is-embedding", "--served-model-name", "bge-m3", "--api-key", KEY) as srv:
        port = srv.bound_port
        status, _, body = request(
            port, "POST", "/v1/embeddings", {"model": "bge-m3", "input": ["a b", "c"]}, AUTH
        )
        again = request(port, "POST", "/v1/embeddings", {"input": "a b"}, AUTH)[2]
        assert request(port, "POST", "/v1/chat/completions", {"messages": []}, AUTH)[0] == 400
        assert request(port, "GET", "/health_generate")[0] == 200
    assert status == 200
    result = json.loads(body)
    assert result["model"] == "bge-m3"
    vectors = [item["embedding"] for item in result["data"]]
    assert [item["index"] for item in result["data"]] == [0, 1]
    assert all(len(v) == server.EMBEDDING_DIM for v in vectors)
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-4) for v in vectors)
    assert vectors[0] != vectors[1]
    assert json.loads(again)["data"][0]["embedding"] == vectors[0]
    assert result["usage"]["prompt_tokens"] == 3


def _parse_metrics(text: str) -> dict[str, float]:
    """Sample name + labels -> value; prometheus_client's parser when installed."""
    samples: dict[str, float] = {}
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        for line in text.splitlines():
            if not line or line.startswith("#"):
                assert line.startswith(("# HELP ", "# TYPE ")) or not line, line
                continue
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)
        return samples
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_metrics_use_sglang_names_and_count_tokens() -> None:
    with running("--enable-metrics", "--served-model-name", "r1") as srv:
        port = srv.bound_port
        status, headers, before = request(port, "GET", "/metrics")
        reply = chat(port)
        request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})  # fmt: skip
        # The server's thread counts a stream as finished just after its last byte: on a busy
        # machine the next scrape can come first, so wait (briefly) for it to settle.
        deadline = time.monotonic() + 5
        while True:
            after = request(port, "GET", "/metrics")[2]
            running_now = _parse_metrics(after.decode()).get(
                'sglang:num_running_reqs{model_name="r1"}'
            )
            if running_now == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = after.decode()
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:time_to_first_token_seconds",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
    ):
        assert name in text
    assert "# TYPE sglang:time_to_first_token_seconds histogram" in text
    old, new = _parse_metrics(before.decode()), _parse_metrics(text)
    label = '{model_name="r1"}'
    assert old[f"sglang:generation_tokens_total{label}"] == 0
    assert new[f"sglang:generation_tokens_total{label}"] > reply["usage"]["completion_tokens"]
    assert new[f"sglang:prompt_tokens_total{label}"] == reply["usage"]["prompt_tokens"] + 1
    assert new[f"sglang:time_to_first_token_seconds_count{label}"] == 2
    assert new[f"sglang:num_running_reqs{label}"] == 0


def test_metrics_need_enable_metrics_like_sglang() -> None:
    with running() as srv:
        assert request(srv.bound_port, "GET", "/metrics")[0] == 404


def test_server_info_says_standin_not_sglang() -> None:
    with running("--tp-size", "8", "--trust-remote-code", "--served-model-name", "r1") as srv:
        status, _, body = request(srv.bound_port, "GET", "/get_server_info")
    info = json.loads(body)
    assert status == 200
    assert info["standin"] is True
    assert info["version"] == server.VERSION_STRING
    assert info["version"].startswith("deepfleet-sglang-standin")
    assert info["tp_size"] == 8 and info["served_model_name"] == "r1"
    assert info["ignored_args"] == ["--trust-remote-code"]


def test_startup_delay_gives_503_until_loaded() -> None:
    with running("--startup-delay", "0.6") as srv:
        assert request(srv.bound_port, "GET", "/health")[0] == 503
        assert request(srv.bound_port, "GET", "/v1/models")[0] == 503
        time.sleep(0.7)
        assert request(srv.bound_port, "GET", "/health")[0] == 200


def test_non_zero_node_rank_serves_only_health() -> None:
    with running("--nnodes", "2", "--node-rank", "1") as srv:
        assert request(srv.bound_port, "GET", "/health")[0] == 200
        assert request(srv.bound_port, "GET", "/v1/models")[0] == 404


# --------------------------------------------------------------------------- as a process


@pytest.fixture
def shim_path(tmp_path: Path) -> Path:
    """The image's /opt/deepfleet-standin tree, staged locally."""
    return image.stage_standin(tmp_path)


def launch(shim: Path, port: int, *flags: str) -> subprocess.Popen[bytes]:
    """``python3 -m sglang.launch_server`` exactly as the unit runs it; -S: stdlib only."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(shim)}
    return subprocess.Popen(
        [sys.executable, "-S", "-m", "sglang.launch_server", *flags, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_launch_server_shim_runs_the_standin_with_stdlib_only(shim_path: Path) -> None:
    port = free_port()
    proc = launch(shim_path, port, *PRODUCTION_FLAGS, "--api-key", KEY, "--enable-metrics")
    try:
        wait_healthy(port)
        status, _, body = request(port, "GET", "/get_server_info", headers=AUTH)
        assert status == 200 and json.loads(body)["tp_size"] == 8
        assert f"port={port}" in chat(port)["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode()
    assert proc.returncode == 0, output
    assert server.READY_LINE in output
    assert "NOT SGLang" in output


def test_sigterm_finishes_in_flight_stream_and_exits_0(shim_path: Path) -> None:
    port = free_port()
    proc = launch(shim_path, port, "--host", "127.0.0.1", "--token-delay", "0.05")
    try:
        wait_healthy(port)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        )
        response = conn.getresponse()
        first = response.readline()  # the stream has started: the request is in flight
        assert first.startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        rest = response.read()
        conn.close()
        assert sse_events(first + rest)[-1] == "[DONE]"
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0].decode()
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output
    with pytest.raises(OSError):
        request(port, "GET", "/health")


# --------------------------------------------------------------------------- image archive


def _fake_rootfs(root: Path) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "dev").mkdir()
    (root / "etc/os-release").write_text('PRETTY_NAME="fake"\n')
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    (root / "bin").symlink_to("usr/bin")
    image.stage_standin(root)
    return root


def _blob(tar: tarfile.TarFile, name: str) -> bytes:
    handle = tar.extractfile(name)
    assert handle is not None
    return handle.read()


def test_archive_structure_and_stable_id(tmp_path: Path) -> None:
    spec = image.ImageSpec()
    rootfs = _fake_rootfs(tmp_path / "rootfs")
    first = image.write_archive(spec, rootfs, tmp_path / "a.tar")
    os.utime(rootfs / "etc/os-release", (2_000_000_000, 2_000_000_000))  # newer than the epoch
    second = image.write_archive(spec, rootfs, tmp_path / "b.tar")
    assert first.image_id == second.image_id
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.repo_tag == f"deepfleet/sglang-standin:{server.VERSION}"

    checked = image.verify_archive(first.path)
    assert (checked.image_id, checked.manifest_digest) == (first.image_id, first.manifest_digest)
    with tarfile.open(first.path) as tar:
        names = tar.getnames()
        assert {"manifest.json", "index.json", "oci-layout", "repositories"} <= set(names)
        manifest = json.loads(_blob(tar, "manifest.json"))[0]
        assert manifest["RepoTags"] == [first.repo_tag]
        config = json.loads(_blob(tar, manifest["Config"]))
        with tarfile.open(fileobj=tar.extractfile(manifest["Layers"][0])) as layer:
            layer_names = layer.getnames()
            members = layer.getmembers()
    assert "sha256:" + manifest["Config"].rsplit("/", 1)[1] == first.image_id
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "deepfleet-sglang-standin"
    env = dict(item.split("=", 1) for item in config["config"]["Env"])
    assert env["PYTHONPATH"] == "/opt/deepfleet-standin"
    assert "/usr/bin" in env["PATH"].split(":")
    assert config["config"]["Cmd"][:3] == ["python3", "-m", "sglang.launch_server"]
    assert layer_names == sorted(layer_names, key=lambda n: n.split("/"))
    assert "opt/deepfleet-standin/sglang/launch_server.py" in layer_names
    assert "opt/deepfleet-standin/deepfleet_standin.py" in layer_names
    assert all(m.mtime <= spec.source_date_epoch for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["bin"].issym() and by_name["usr/bin/tool-alias"].islnk()


def test_verify_archive_rejects_a_tampered_blob(tmp_path: Path) -> None:
    good = image.write_archive(image.ImageSpec(), _fake_rootfs(tmp_path / "r"), tmp_path / "a.tar")
    bad = tmp_path / "bad.tar"
    with tarfile.open(good.path) as src, tarfile.open(bad, "w") as dst:
        config_name = json.loads(_blob(src, "manifest.json"))[0]["Config"]
        for member in src.getmembers():
            data = src.extractfile(member) if member.isfile() else None
            if member.name == config_name:
                config = json.loads(_blob(src, config_name))
                config["config"]["Labels"]["org.opencontainers.image.title"] = "sglang"
                payload = json.dumps(config).encode()
                member.size = len(payload)
                data = io.BytesIO(payload)
            dst.addfile(member, data)
    with pytest.raises(image.ImageBuildError, match=r"config blob .* has digest"):
        image.verify_archive(bad)


def test_cache_key_depends_on_inputs() -> None:
    base = image.ImageSpec()
    assert base.cache_key() == image.ImageSpec().cache_key()
    assert base.cache_key() != image.ImageSpec(mirror="http://snapshot.debian.org/x").cache_key()
    assert base.cache_key() != image.ImageSpec(packages=("python3-minimal",)).cache_key()


def _why_no_build() -> str | None:
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (apt-get install mmdebstrap)"
    if os.geteuid() != 0:
        return "building the rootfs and chroot need root"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_why_no_build() is not None, reason=str(_why_no_build()))
def test_built_image_runs_under_chroot(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    built = image.build_standin_image(cache)
    assert not built.cached
    checked = image.verify_archive(built.path)
    assert checked.image_id == built.image_id
    again = image.build_standin_image(cache)
    assert again.cached and again.image_id == built.image_id
    assert built.size_bytes < 200 * 2**20, "the stand-in image should stay small"

    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    with tarfile.open(built.path) as tar:
        manifest = json.loads(_blob(tar, "manifest.json"))[0]
        config = json.loads(_blob(tar, manifest["Config"]))
        layer_file = tar.extractfile(manifest["Layers"][0])
        assert layer_file is not None
        with tarfile.open(fileobj=layer_file) as layer:
            layer.extractall(rootfs, filter="fully_trusted")
    env = dict(item.split("=", 1) for item in config["config"]["Env"])
    port = free_port()
    proc = subprocess.Popen(
        ["chroot", str(rootfs), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
         "python3", "-m", "sglang.launch_server", "--model-path", "/models/r1", "--tp", "8",
         "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--enable-metrics",
         "--trust-remote-code"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_healthy(port)
        reply = chat(port)["choices"][0]["message"]["content"]
        assert f"port={port}" in reply and server.NAME in reply
        assert request(port, "GET", "/metrics")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=15)[0].decode()
    assert proc.returncode == 0, output

    rebuilt = image.build_standin_image(cache, force=True)
    assert rebuilt.image_id == built.image_id, "same inputs must give the same image ID"


DOCKER_ROOTFS_ENV = "DEEPFLEET_STANDIN_DOCKER_ROOTFS"
_DOCKER_CHECK = """#!/bin/sh
set -eu
dockerd --bridge=none --iptables=false --ip6tables=false >/tmp/dockerd.log 2>&1 &
i=0
until docker info >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 120 ] && { tail -30 /tmp/dockerd.log; exit 1; }; sleep 0.5
done
docker load -i /check/image.tar
echo "ID=$(docker image inspect --format '{{.Id}}' @REPO_TAG@)"
docker run -d --name sglang --network host --ipc=host -v /tmp:/models @REPO_TAG@ \\
  python3 -m sglang.launch_server --model-path /models --tp 8 --trust-remote-code \\
  --host 127.0.0.1 --port 30000 --api-key @API_KEY@ --mem-fraction-static 0.85 >/dev/null
i=0
until curl -fsS -o /dev/null http://127.0.0.1:30000/health 2>/dev/null; do
  i=$((i+1)); [ $i -gt 60 ] && { docker logs sglang; exit 1; }; sleep 0.5
done
echo "NOKEY=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:30000/v1/models)"
echo "REPLY=$(curl -fsS -H 'Authorization: Bearer @API_KEY@' http://127.0.0.1:30000/v1/chat/completions \\
  -d '{"messages":[{"role":"user","content":"hi"}]}')"
docker stop sglang >/dev/null
echo "EXIT=$(docker inspect --format '{{.State.ExitCode}}' sglang)"
"""


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get(DOCKER_ROOTFS_ENV) is None or _why_no_build() is not None,
    reason=f"set {DOCKER_ROOTFS_ENV} to a bookworm rootfs with docker.io and curl "
    "(mmdebstrap --variant=apt --include=docker.io,curl bookworm DIR) and run as root",
)
def test_docker_load_and_run_in_a_throwaway_nspawn(tmp_path: Path) -> None:
    """docker load -i + docker run with Debian's docker.io, inside systemd-nspawn."""
    rootfs = Path(os.environ[DOCKER_ROOTFS_ENV])
    built = image.build_standin_image(tmp_path / "cache")
    check = tmp_path / "check"
    check.mkdir()
    os.link(built.path, check / "image.tar")
    script = _DOCKER_CHECK.replace("@REPO_TAG@", built.repo_tag).replace("@API_KEY@", KEY)
    (check / "run.sh").write_text(script)
    (check / "run.sh").chmod(0o755)
    docker_dir = tmp_path / "docker"  # overlay2 cannot stack on the overlay root: bind it
    docker_dir.mkdir()
    env = {
        **os.environ,
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",
    }
    result = subprocess.run(
        ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "--timezone=off",
         "--volatile=overlay", "--private-network",
         "--capability=CAP_NET_ADMIN,CAP_BPF,CAP_PERFMON",
         "--system-call-filter=bpf add_key keyctl request_key",
         f"--bind={docker_dir}:/var/lib/docker", f"--bind-ro={check}:/check",
         "-D", str(rootfs), "/check/run.sh"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    shutil.rmtree(docker_dir, ignore_errors=True)
    lines = dict(
        line.split("=", 1)
        for line in result.stdout.splitlines()
        if line[:3].isupper() and "=" in line
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines["ID"] == built.image_id
    assert lines["NOKEY"] == "401"
    assert server.NAME in lines["REPLY"] and "port=30000" in lines["REPLY"]
    assert lines["EXIT"] == "0"
