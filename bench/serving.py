"""Serving check against the running lab: a bounded request loop through the load balancer.

    .venv/bin/python bench/serving.py [--requests 200] [--concurrency 4] [--stream-share 0.5]
                                      [--config-change | --rolling-restart | --during "COMMAND"]
                                      [--json]

Reads the endpoint and API key from `deepfleet lab status --json` and talks only to that
endpoint (the lab's load-balancer node, checked against the lab's node list). Sends
--requests chat completions (and, while a restart runs, more until it is over: at most
MAX_REQUESTS and --max-seconds in all) (a share of them streaming, SSE) with --concurrency workers, then
reports successes, failures by reason, latency percentiles and, for streams, time to first byte.

--config-change is what a user does: while the loop is going, it deploys (`pyinfra -y
inventory.py deploy.py`) a copy of the spec whose first deployment runs with another engine
setting (max_running_requests), so the `sglang` role rolls the change through the replicas, then deploys the spec
itself again (a second rolling restart, back to where it started).

--rolling-restart runs, while the loop is going, the rolling restart the `sglang` role would run
(the same steps from `roles.sglang.rolling_restart_plan`, each over `deepfleet lab ssh`):
drain the replica in HAProxy, restart its engine, wait for /health_generate, put it back, one
replica after the other. --during runs any command instead (e.g. a `pyinfra` deploy after a
spec change). Either way the report says how many requests failed while it ran: the target is 0.
Exit code: 0 when every request succeeded, 1 otherwise, 2 when the lab is not usable.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
DEEPFLEET = PROJECT / ".venv" / "bin" / "deepfleet"
MAX_REQUESTS = 10_000  # a bound even when asked for more
REQUEST_TIMEOUT_S = 120


@dataclass
class Result:
    ok: bool
    stream: bool
    started: float
    latency_s: float
    first_byte_s: float | None = None
    error: str = ""
    served_by: str = ""


@dataclass
class Report:
    endpoint: str
    requests: int
    succeeded: int
    failed: int
    errors: dict[str, int]
    latency_s: dict[str, float]
    stream_first_byte_s: dict[str, float]
    served_by: dict[str, int]
    during: str | None = None
    during_seconds: float | None = None
    during_exit_code: int | None = None
    failed_during: int = 0
    requests_during: int = 0
    steps: list[str] = field(default_factory=list)


def lab_status() -> dict[str, Any]:
    deepfleet = str(DEEPFLEET) if DEEPFLEET.exists() else "deepfleet"
    result = subprocess.run(
        [deepfleet, "lab", "status", "--json"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"deepfleet lab status failed: {result.stderr.strip()}")
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def checked_endpoint(status: dict[str, Any]) -> str:
    """The lab's endpoint, only if it is the address of one of the lab's lb nodes."""
    endpoint = status.get("endpoint")
    if not endpoint:
        raise SystemExit("the lab has no load-balancer node (no endpoint): run the lead's lab")
    host = urllib.parse.urlsplit(str(endpoint)).hostname
    lb_addresses = {n["address"] for n in status.get("nodes", []) if "lb" in n.get("groups", [])}
    if host not in lb_addresses:
        raise SystemExit(f"refusing {endpoint}: not a lab load-balancer address {lb_addresses}")
    down = [n["name"] for n in status.get("nodes", []) if n.get("state") != "running"]
    if down:
        print(f"warning: lab nodes not running: {', '.join(down)}", file=sys.stderr)
    return str(endpoint).rstrip("/")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 4)

    return {
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "max": round(ordered[-1], 4),
        "mean": round(statistics.fmean(ordered), 4),
    }


def one_request(endpoint: str, key: str | None, model: str, stream: bool, n: int) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"deepfleet serving bench request {n}"}],
        "max_tokens": 32,
        "stream": stream,
    }
    request = urllib.request.Request(
        f"{endpoint}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    started = time.monotonic()
    first: float | None = None
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            if not stream:
                payload = json.loads(response.read())
                text = payload["choices"][0]["message"]["content"]
                return Result(
                    True, False, started, time.monotonic() - started, None, "", _host(text)
                )
            done, text = False, ""
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                if first is None:
                    first = time.monotonic() - started
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices", []):
                    text += (choice.get("delta") or {}).get("content") or ""
            latency = time.monotonic() - started
            if not done:
                return Result(False, True, started, latency, first, "stream ended without [DONE]")
            return Result(True, True, started, latency, first, "", _host(text))
    except urllib.error.HTTPError as error:
        return Result(
            False, stream, started, time.monotonic() - started, first, f"HTTP {error.code}"
        )
    except (OSError, ValueError, KeyError) as error:
        reason = getattr(error, "reason", None) or type(error).__name__
        return Result(False, stream, started, time.monotonic() - started, first, str(reason))


def _host(text: str) -> str:
    # The stand-in's replies start "[deepfleet-sglang-standin] host=<hostname> port=<port>".
    for word in text.split():
        if word.startswith("host="):
            return word[5:]
    return "?"


def model_name(endpoint: str, key: str | None) -> str:
    request = urllib.request.Request(f"{endpoint}/v1/models")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["data"][0]["id"])


def rolling_restart_commands(spec_path: str) -> list[tuple[str, str, str]]:
    """(step name, node, command) of the sglang role's rolling restart, in order."""
    from infra.spec import load_spec
    from roles.sglang import rolling_restart_plan

    steps = rolling_restart_plan(load_spec(PROJECT / spec_path))
    return [
        (step.name, node, command)
        for step in steps
        for node, commands in sorted(step.commands.items())
        for command in commands
    ]


def run_rolling_restart(spec_path: str, log: list[str]) -> int:
    deepfleet = str(DEEPFLEET) if DEEPFLEET.exists() else "deepfleet"
    for name, node, command in rolling_restart_commands(spec_path):
        started = time.monotonic()
        result = subprocess.run(
            [deepfleet, "lab", "ssh", node, "--", command],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            check=False,
        )
        log.append(
            f"{time.monotonic() - started:6.1f}s {node}: {name}: exit {result.returncode} "
            f"{(result.stdout + result.stderr).strip()[-200:]}"
        )
        if result.returncode != 0:
            return result.returncode
    return 0


CHANGED_SETTING = {"max_running_requests": 48}  # any engine setting: it changes the unit


def changed_spec(spec_path: str, directory: Path) -> Path:
    """A copy of the spec whose first deployment runs with another engine setting."""
    import yaml

    from infra.spec import ClusterSpec, load_spec

    data = load_spec(PROJECT / spec_path).model_dump(mode="json", exclude_defaults=True)
    first = data["deployments"][0]
    first.update(CHANGED_SETTING)
    ClusterSpec.model_validate(data)  # the change itself must be a valid spec
    path = directory / "config-change.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def deploy(spec: Path, log: list[str]) -> int:
    """The real deploy of SPEC (relative paths in it resolve against the project); logs how
    many replicas the sglang role drained and restarted."""
    from infra.deploy_results import changed_operations, parse_results

    started = time.monotonic()
    result = subprocess.run(
        [str(PROJECT / ".venv/bin/pyinfra"), "-y", "--json", "inventory.py", "deploy.py"],
        cwd=PROJECT,
        env={**os.environ, "DEEPFLEET_SPEC": str(spec), "PYINFRA_PROGRESS": "off"},
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        changed = changed_operations(parse_results(result.stdout))
    except ValueError:  # no JSON: pyinfra failed before it could report
        changed = []
    restarts = [name for name in changed if "[sglang] Restart " in name]
    drains = [name for name in changed if "out of the load balancer" in name]
    log.append(
        f"{time.monotonic() - started:6.1f}s deploy {spec.name}: exit {result.returncode}, "
        f"{len(restarts)} replica restart(s), {len(drains)} drain(s)"
    )
    if result.returncode != 0:
        log.append(" | ".join((result.stdout + result.stderr).strip().splitlines()[-5:]))
    return result.returncode


def run_config_change(spec_path: str, log: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="deepfleet-config-change-") as directory:
        code = deploy(changed_spec(spec_path, Path(directory)), log)
    # Back to the spec itself, under the same loop: a second rolling restart.
    return deploy(PROJECT / spec_path, log) or code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--interval", type=float, default=0.05, help="pause per worker (s)")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--spec", default="hosts/lab.yaml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config-change", action="store_true")
    group.add_argument("--rolling-restart", action="store_true")
    group.add_argument("--during", metavar="COMMAND")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    status = lab_status()
    endpoint = checked_endpoint(status)
    key = status.get("api_key")
    total = max(1, min(args.requests, MAX_REQUESTS))
    try:
        model = model_name(endpoint, key)
    except (OSError, ValueError, KeyError) as error:
        print(f"{endpoint}/v1/models does not answer: {error}", file=sys.stderr)
        return 2

    results: list[Result] = []
    lock = threading.Lock()
    counter = iter(range(total))
    extra = iter(range(total, MAX_REQUESTS))

    side_done = threading.Event()
    deadline = time.monotonic() + args.max_seconds
    restarting = bool(args.config_change or args.rolling_restart or args.during)

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(counter, None)
            if n is None and restarting and not side_done.is_set():
                n = next(extra, None)  # keep the loop going until the restart is over
            if n is None:
                return
            stream = (n % 100) < args.stream_share * 100
            result = one_request(endpoint, key, model, stream, n)
            with lock:
                results.append(result)
            time.sleep(args.interval)

    steps: list[str] = []
    window: list[float] = []
    outcome: dict[str, int] = {}

    def background() -> None:
        time.sleep(1.0)  # let the loop reach a steady state first
        window.append(time.monotonic())
        if args.config_change:
            outcome["code"] = run_config_change(args.spec, steps)
        elif args.rolling_restart:
            outcome["code"] = run_rolling_restart(args.spec, steps)
        else:
            outcome["code"] = subprocess.call(shlex.split(args.during), cwd=PROJECT)
        window.append(time.monotonic())
        time.sleep(1.0)  # and a little after it
        side_done.set()

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.concurrency))]
    side = None
    if restarting:
        side = threading.Thread(target=background)
        side.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if side is not None:
        if side.is_alive():
            print("the request loop ended before the restart: waiting for it", file=sys.stderr)
        side.join()

    failed = [r for r in results if not r.ok]
    report = Report(
        endpoint=endpoint,
        requests=len(results),
        succeeded=len(results) - len(failed),
        failed=len(failed),
        errors=dict(Counter(r.error for r in failed)),
        latency_s=percentiles([r.latency_s for r in results if r.ok]),
        stream_first_byte_s=percentiles(
            [r.first_byte_s for r in results if r.ok and r.stream and r.first_byte_s is not None]
        ),
        served_by=dict(Counter(r.served_by for r in results if r.ok)),
        steps=steps,
    )
    if len(window) == 2:
        start, end = window
        report.during = (
            "config change deployed and reverted"
            if args.config_change
            else "rolling restart"
            if args.rolling_restart
            else args.during
        )
        report.during_seconds = round(end - start, 1)
        report.during_exit_code = outcome.get("code")
        inside = [r for r in results if start <= r.started + r.latency_s and r.started <= end]
        report.requests_during = len(inside)
        report.failed_during = sum(1 for r in inside if not r.ok)
        if report.requests_during == 0:
            print("warning: no request overlapped the restart: raise --requests", file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"endpoint {endpoint}: {report.succeeded}/{report.requests} succeeded")
        print(f"latency (s): {report.latency_s}")
        print(f"stream first byte (s): {report.stream_first_byte_s}")
        print(f"served by: {report.served_by}")
        if report.errors:
            print(f"errors: {report.errors}")
        if report.during:
            print(
                f"during {report.during} ({report.during_seconds} s, exit "
                f"{report.during_exit_code}): {report.failed_during} of "
                f"{report.requests_during} overlapping requests failed (target 0)"
            )
            for line in steps:
                print(f"  {line}")
    return 0 if not failed and outcome.get("code", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
