"""deepfleet-sglang-standin: a tiny, dependency-free stand-in for SGLang's HTTP server.

This is NOT SGLang. It exists only for the lab, where there is no GPU and no SGLang image: it
is started with the same command line as ``python3 -m sglang.launch_server`` (unknown SGLang
flags are accepted and ignored) and answers SGLang's HTTP surface with deterministic canned
replies that name the host and port that answered. Production never runs it.

The module uses the standard library only, so the container image needs nothing but
``python3-minimal`` and ``libpython3.11-stdlib``. Inside the image it is importable as
``deepfleet_standin`` and a two-line ``sglang.launch_server`` shim calls :func:`main`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

NAME = "deepfleet-sglang-standin"
VERSION = "0.1.0"
#: What the stand-in reports wherever SGLang would report its version.
VERSION_STRING = f"{NAME}-{VERSION}"

STARTUP_DELAY_ENV = "DEEPFLEET_STANDIN_STARTUP_DELAY"
TOKEN_DELAY_ENV = "DEEPFLEET_STANDIN_TOKEN_DELAY"
EMBEDDING_DIM = 8
#: Idle keep-alive connections are closed after this many seconds (bounds a graceful stop).
IDLE_TIMEOUT_S = 5.0
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
READY_LINE = "The server is fired up and ready to roll!"


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class StandinConfig:
    """The SGLang flags the stand-in understands; every other flag is kept in ``ignored``."""

    model_path: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    tp_size: int = 1
    dp_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    enable_metrics: bool = False
    disaggregation_mode: str = "null"
    is_embedding: bool = False
    startup_delay: float = 0.0
    token_delay: float = 0.0
    ignored: tuple[str, ...] = ()

    @property
    def serves_api(self) -> bool:
        """Like SGLang, only node rank 0 of a multi-node group serves the API."""
        return self.node_rank == 0


def _env_float(name: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{NAME}: {name}={raw!r} is not a number of seconds") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser for the SGLang flags the stand-in reads (``--tp`` abbreviates ``--tp-size``)."""
    parser = argparse.ArgumentParser(
        prog="python3 -m sglang.launch_server",
        description=f"{NAME} {VERSION}: a lab stand-in for SGLang's HTTP server (not SGLang).",
        epilog="Every other SGLang flag is accepted and ignored.",
    )
    parser.add_argument("--model-path", "--model", dest="model_path", default="/models")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    parser.add_argument("--dp-size", "--data-parallel-size", dest="dp_size", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--enable-metrics", action="store_true")
    parser.add_argument("--disaggregation-mode", default="null")
    parser.add_argument("--is-embedding", action="store_true")
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=None,
        help=f"seconds of simulated weight loading (/health is 503 until then; "
        f"default ${STARTUP_DELAY_ENV} or 0)",
    )
    parser.add_argument(
        "--token-delay",
        type=float,
        default=None,
        help=f"seconds per generated token (default ${TOKEN_DELAY_ENV} or 0)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> StandinConfig:
    """Parse an SGLang command line; unknown flags (and their values) are ignored."""
    args, ignored = build_parser().parse_known_args(argv)
    startup_delay = args.startup_delay
    if startup_delay is None:
        startup_delay = _env_float(STARTUP_DELAY_ENV)
    token_delay = args.token_delay
    if token_delay is None:
        token_delay = _env_float(TOKEN_DELAY_ENV)
    return StandinConfig(
        model_path=args.model_path,
        served_model_name=args.served_model_name or args.model_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        tp_size=args.tp_size,
        dp_size=args.dp_size,
        node_rank=args.node_rank,
        nnodes=args.nnodes,
        enable_metrics=args.enable_metrics,
        disaggregation_mode=args.disaggregation_mode,
        is_embedding=args.is_embedding,
        startup_delay=max(0.0, startup_delay),
        token_delay=max(0.0, token_delay),
        ignored=tuple(ignored),
    )


# --------------------------------------------------------------------------- fake engine


def count_tokens(text: str) -> int:
    """A whitespace 'tokenizer': deterministic and good enough for counters."""
    return len(text.split())


def canned_reply(hostname: str, port: int, model: str, prompt: str) -> str:
    """The deterministic answer; it names the replica so tests can tell who answered."""
    words = prompt.split()
    echo = " ".join(words[:16]) + (" ..." if len(words) > 16 else "")
    return (
        f"[{NAME}] host={hostname} port={port} model={model} "
        f"(a lab stand-in, not a language model) you said: {echo}"
    )


def embed(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector derived from the SHA-256 of the text."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(digest[i] - 127.5) / 127.5 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1


@dataclass
class Metrics:
    """Counters and gauges with SGLang's metric names."""

    model_name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    queued: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))

    def render(self) -> str:
        label = 'model_name="' + self.model_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out: list[str] = []

        def scalar(name: str, kind: str, help_: str, value: float, suffix: str = "") -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name}{suffix}{{{label}}} {value}")

        def histogram(name: str, help_: str, hist: Histogram) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} histogram")
            for bound, count in zip(hist.bounds, hist.counts, strict=True):
                out.append(f'{name}_bucket{{{label},le="{bound}"}} {count}')
            out.append(f'{name}_bucket{{{label},le="+Inf"}} {hist.count}')
            out.append(f"{name}_sum{{{label}}} {hist.total}")
            out.append(f"{name}_count{{{label}}} {hist.count}")

        with self.lock:
            scalar("sglang:num_running_reqs", "gauge", "Running requests.", self.running)
            scalar("sglang:num_queue_reqs", "gauge", "Requests in the waiting queue.", self.queued)
            scalar(
                "sglang:prompt_tokens", "counter", "Prefill tokens.", self.prompt_tokens, "_total"
            )
            scalar(
                "sglang:generation_tokens",
                "counter",
                "Generation tokens.",
                self.generation_tokens,
                "_total",
            )
            scalar("sglang:num_requests", "counter", "Requests.", self.requests, "_total")
            histogram("sglang:time_to_first_token_seconds", "Time to first token.", self.ttft)
            histogram("sglang:e2e_request_latency_seconds", "End-to-end latency.", self.e2e)
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- HTTP server


class ApiError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: HTTPStatus, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {
            "object": "error",
            "message": self.message,
            "type": self.kind,
            "param": None,
            "code": int(self.status),
        }


class StandinServer(ThreadingHTTPServer):
    """The HTTP server plus the stand-in's state; request threads are joined on close."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128  # load tests open many connections at once

    def __init__(self, config: StandinConfig, hostname: str | None = None) -> None:
        self.config = config
        self.hostname = hostname or socket.gethostname()
        self.metrics = Metrics(model_name=config.served_model_name)
        self.started_at = time.monotonic()
        self.created = int(time.time())
        self.stopping = threading.Event()
        if ":" in config.host:  # --host :: or another IPv6 address
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), StandinHandler)

    @property
    def bound_port(self) -> int:
        return int(self.server_address[1])

    def generate(self, prompt: str, max_tokens: object = None) -> tuple[list[str], str]:
        """The fake engine: canned reply words and the finish reason ("stop" or "length")."""
        words = canned_reply(
            self.hostname, self.bound_port, self.config.served_model_name, prompt
        ).split(" ")
        if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
            return words[:max_tokens], "length"
        return words, "stop"

    def is_loaded(self) -> bool:
        return time.monotonic() - self.started_at >= self.config.startup_delay

    def request_stop(self) -> None:
        """Stop accepting requests; in-flight ones finish. Safe to call from a signal handler."""
        if not self.stopping.is_set():
            self.stopping.set()
            threading.Thread(target=self.shutdown, name="standin-shutdown", daemon=True).start()


class StandinHandler(BaseHTTPRequestHandler):
    """Routes SGLang's HTTP endpoints to canned answers."""

    server: StandinServer
    protocol_version = "HTTP/1.1"
    server_version = f"{NAME}/{VERSION}"
    timeout = IDLE_TIMEOUT_S

    OPEN_PREFIXES: ClassVar[tuple[str, ...]] = ("/health", "/metrics")

    # ----------------------------------------------------------------- plumbing

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{NAME} {self.address_string()} {format % args}\n")

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # An error may leave a request body unread: never reuse such a connection.
        if self.server.stopping.is_set() or status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _read_json(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            payload = json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"request body is not JSON: {error}") from None
        if not isinstance(payload, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        return payload

    def _authorized(self) -> bool:
        key = self.server.config.api_key
        if key is None or self.path.startswith(self.OPEN_PREFIXES):
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode("utf-8"), f"Bearer {key}".encode())

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0]
        if self.server.stopping.is_set():
            self.close_connection = True
        try:
            if not self._authorized():
                self._send_json(HTTPStatus.UNAUTHORIZED, {"error": "Unauthorized"})
                return
            handler = routes.get(path)
            if handler is None or (
                not self.server.config.serves_api and not path.startswith("/health")
            ):
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {self.command} {path}", "NotFound")
            handler()
        except ApiError as error:
            self._send_json(error.status, error.body())
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-answer
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch(
            {
                "/health": self._health,
                "/health_generate": self._health_generate,
                "/v1/models": self._models,
                "/metrics": self._metrics,
                "/get_server_info": self._server_info,
                "/server_info": self._server_info,
                "/get_model_info": self._model_info,
                "/model_info": self._model_info,
            }
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        self._dispatch(
            {
                "/v1/chat/completions": self._chat_completions,
                "/v1/embeddings": self._embeddings,
            }
        )

    # ----------------------------------------------------------------- endpoints

    def _require_loaded(self) -> None:
        if not self.server.is_loaded():
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{NAME} is still loading weights (simulated --startup-delay)",
                "ServiceUnavailable",
            )

    def _health(self) -> None:
        self._require_loaded()
        self._send_bytes(HTTPStatus.OK, b"", "text/plain")

    def _health_generate(self) -> None:
        """Like SGLang: run one tiny request through the engine, 200 if it produced output."""
        self._require_loaded()
        ok = (
            bool(embed("health"))
            if self.server.config.is_embedding
            else bool(self.server.generate("health check", max_tokens=1)[0])
        )
        if not ok:
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE, "generation failed", "ServiceUnavailable"
            )
        self._send_bytes(HTTPStatus.OK, b"", "text/plain")

    def _models(self) -> None:
        self._require_loaded()
        name = self.server.config.served_model_name
        self._send_json(
            HTTPStatus.OK,
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": self.server.created,
                        "owned_by": NAME,
                        "root": name,
                    }
                ],
            },
        )

    def _metrics(self) -> None:
        if not self.server.config.enable_metrics:
            raise ApiError(HTTPStatus.NOT_FOUND, "metrics are off: start with --enable-metrics")
        body = self.server.metrics.render().encode("utf-8")
        self._send_bytes(HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8")

    def _server_info(self) -> None:
        config = self.server.config
        self._send_json(
            HTTPStatus.OK,
            {
                "standin": True,
                "name": NAME,
                "version": VERSION_STRING,
                "hostname": self.server.hostname,
                "model_path": config.model_path,
                "served_model_name": config.served_model_name,
                "host": config.host,
                "port": self.server.bound_port,
                "tp_size": config.tp_size,
                "dp_size": config.dp_size,
                "nnodes": config.nnodes,
                "node_rank": config.node_rank,
                "enable_metrics": config.enable_metrics,
                "disaggregation_mode": config.disaggregation_mode,
                "is_embedding": config.is_embedding,
                "api_key_set": config.api_key is not None,
                "ignored_args": list(config.ignored),
                "loaded": self.server.is_loaded(),
            },
        )

    def _model_info(self) -> None:
        config = self.server.config
        self._send_json(
            HTTPStatus.OK,
            {
                "model_path": config.model_path,
                "tokenizer_path": config.model_path,
                "is_generation": not config.is_embedding,
            },
        )

    def _embeddings(self) -> None:
        self._require_loaded()
        config = self.server.config
        if not config.is_embedding:
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "this server serves a generation model; start it with --is-embedding",
            )
        request = self._read_json()
        raw = request.get("input")
        if isinstance(raw, str):
            texts = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
            texts = [str(t) for t in raw]
        else:
            raise ApiError(HTTPStatus.BAD_REQUEST, "'input' must be a string or a list of strings")
        tokens = sum(count_tokens(t) for t in texts)
        metrics = self.server.metrics
        with metrics.lock:
            metrics.requests += 1
            metrics.prompt_tokens += tokens
        self._send_json(
            HTTPStatus.OK,
            {
                "object": "list",
                "model": config.served_model_name,
                "data": [
                    {"object": "embedding", "index": i, "embedding": embed(t)}
                    for i, t in enumerate(texts)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _chat_completions(self) -> None:
        self._require_loaded()
        config = self.server.config
        if config.is_embedding:
            raise ApiError(HTTPStatus.BAD_REQUEST, "this server serves an embedding model")
        request = self._read_json()
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list")
        turns: list[tuple[str, str]] = []
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise ApiError(HTTPStatus.BAD_REQUEST, "each message needs a 'role'")
            content = message.get("content") or ""
            if isinstance(content, list):  # OpenAI content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            turns.append((str(message["role"]), str(content)))
        prompt_parts = [text for _, text in turns]
        last_user = next((text for role, text in reversed(turns) if role == "user"), turns[-1][1])
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
        words, finish_reason = self.server.generate(last_user, max_tokens)
        prompt_tokens = max(1, sum(count_tokens(p) for p in prompt_parts))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        }
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        metrics = self.server.metrics
        started = time.monotonic()
        with metrics.lock:
            metrics.running += 1
        try:
            if request.get("stream"):
                options = request.get("stream_options")
                include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
                self._stream_chat(
                    completion_id, created, words, finish_reason, usage if include_usage else None
                )
            else:
                for _ in words:
                    self._token_pause()
                ttft = time.monotonic() - started
                self._send_json(
                    HTTPStatus.OK,
                    {
                        "id": completion_id,
                        "object": "chat.completion",
                        "created": created,
                        "model": config.served_model_name,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": " ".join(words)},
                                "logprobs": None,
                                "finish_reason": finish_reason,
                            }
                        ],
                        "usage": usage,
                    },
                )
                self._record(started, ttft, prompt_tokens, len(words))
                return
        finally:
            with metrics.lock:
                metrics.running -= 1
        self._record(started, None, prompt_tokens, len(words))

    def _token_pause(self) -> None:
        if self.server.config.token_delay > 0:
            time.sleep(self.server.config.token_delay)

    def _record(self, started: float, ttft: float | None, prompt: int, generated: int) -> None:
        metrics = self.server.metrics
        with metrics.lock:
            metrics.requests += 1
            metrics.prompt_tokens += prompt
            metrics.generation_tokens += generated
            if ttft is not None:
                metrics.ttft.observe(ttft)
            metrics.e2e.observe(time.monotonic() - started)

    def _stream_chat(
        self,
        completion_id: str,
        created: int,
        words: list[str],
        finish_reason: str,
        usage: dict[str, int] | None,
    ) -> None:
        model = self.server.config.served_model_name
        started = time.monotonic()

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        def events() -> Iterator[dict[str, Any]]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for i, word in enumerate(words):
                self._token_pause()
                yield chunk({"content": word if i == 0 else " " + word}, None)
            yield chunk({}, finish_reason)
            if usage is not None:
                final = chunk({}, None)
                final["choices"] = []
                final["usage"] = usage
                yield final

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        first = True
        for event in events():
            self._write_chunk(f"data: {json.dumps(event)}\n\n".encode())
            if first and len(event["choices"]) and event["choices"][0]["delta"].get("content"):
                first = False
                with self.server.metrics.lock:
                    self.server.metrics.ttft.observe(time.monotonic() - started)
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


# --------------------------------------------------------------------------- entry point


def serve(config: StandinConfig, hostname: str | None = None) -> StandinServer:
    """Bind the server (port 0 picks a free one); call ``serve_forever()`` on the result."""
    return StandinServer(config, hostname=hostname)


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM or SIGINT, finish in-flight requests, exit 0."""
    config = parse_args(argv)
    server = serve(config)

    def on_signal(signum: int, _frame: object) -> None:
        sys.stderr.write(f"{NAME}: {signal.Signals(signum).name} received, draining\n")
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sys.stderr.write(
        f"{NAME} {VERSION} (NOT SGLang) serving {config.served_model_name!r} on "
        f"http://{config.host}:{server.bound_port} hostname={server.hostname} "
        f"tp={config.tp_size} node_rank={config.node_rank}/{config.nnodes}"
        + (f"; ignoring {' '.join(config.ignored)}" if config.ignored else "")
        + "\n"
    )

    def announce_ready() -> None:
        sys.stderr.write(READY_LINE + "\n")
        sys.stderr.flush()

    if config.startup_delay > 0:
        sys.stderr.write(f"{NAME}: simulating {config.startup_delay:g}s of weight loading\n")
        timer = threading.Timer(config.startup_delay, announce_ready)
        timer.daemon = True
        timer.start()
    else:
        announce_ready()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # joins in-flight request threads
    sys.stderr.write(f"{NAME}: stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
