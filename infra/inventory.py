"""The bridge between a cluster spec and pyinfra: inventory groups and per-host connection data.

`inventory.py` and `deploy.py` at the top level are thin: they call into here, so the same spec
loading (and the same errors) serve the CLI and stock `pyinfra inventory.py deploy.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

from infra.errors import UserError
from infra.spec import GROUPS, ClusterSpec, load_spec

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = "hosts/lab.yaml"
SPEC_VARIABLE = "DEEPFLEET_SPEC"
# Saved `pulumi stack output --json` for cloud nodes, whose addresses only Pulumi knows.
OUTPUTS_VARIABLE = "DEEPFLEET_OUTPUTS"
# Without a saved file: the stack whose outputs `pulumi stack output --json` reads (default:
# the spec's name; empty: never run pulumi).
STACK_VARIABLE = "DEEPFLEET_STACK"
STACK_OUTPUT_TIMEOUT_S = 120
# Storage kinds whose mount source is a Pulumi output (infra.components.cluster has the same;
# importing it here would pull Pulumi into every pyinfra run).
CLOUD_STORAGE_KINDS = ("fsx-lustre", "efs")

HostEntry = tuple[str, dict[str, Any]]


def spec_path() -> Path:
    path = Path(os.environ.get(SPEC_VARIABLE, DEFAULT_SPEC))
    return path if path.is_absolute() else PROJECT_DIR / path


@lru_cache(maxsize=4)
def _load(path: Path) -> ClusterSpec:
    return load_spec(path)


def current_spec() -> ClusterSpec:
    """The spec named by DEEPFLEET_SPEC; on bad input print the error and exit 2 (no traceback)."""
    try:
        return _load(spec_path())
    except UserError as error:
        print(error.render(), file=sys.stderr)
        raise SystemExit(2) from None


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _needs_outputs(spec: ClusterSpec) -> bool:
    """Whether pyinfra needs Pulumi's outputs: nodes without a spec address (cloud nodes), or
    cloud file systems whose DNS names only Pulumi knows."""
    return any(n.address is None for n in spec.nodes) or any(
        s.kind in CLOUD_STORAGE_KINDS for s in spec.storage
    )


def stack_name(spec: ClusterSpec) -> str | None:
    """The Pulumi stack to read outputs from: $DEEPFLEET_STACK, else the spec's name (one stack
    per spec, named after it: docs/pulumi.md). An empty DEEPFLEET_STACK turns Pulumi off."""
    stack = os.environ.get(STACK_VARIABLE)
    return spec.name if stack is None else (stack or None)


@lru_cache(maxsize=4)
def _stack_output_text(pulumi: str, stack: str) -> str:
    """`pulumi stack output --json` of one stack, run once per process (every pyinfra host and
    role asks for the addresses). Never `--show-secrets`: secret outputs stay "[secret]"."""
    command = [pulumi, "stack", "output", "--json", "--stack", stack, "--non-interactive"]
    fix = (
        f"check that stack {stack!r} exists and is up (`pulumi stack ls`, `pulumi up`), or name "
        f"another with {STACK_VARIABLE}=<stack>, or save the outputs with `pulumi stack output "
        f"--json --stack <stack> > outputs.json` and set {OUTPUTS_VARIABLE}=outputs.json"
    )
    try:
        result = subprocess.run(
            command,
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=STACK_OUTPUT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _fail(
            f"`pulumi {' '.join(command[1:])}` took over {STACK_OUTPUT_TIMEOUT_S} s "
            f"(state backend unreachable?): {fix}"
        )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        _fail(
            f"`pulumi {' '.join(command[1:])}` failed (exit {result.returncode}"
            f"{': ' + ' / '.join(detail) if detail else ''}): {fix}"
        )
    return result.stdout


def _parse_outputs(text: str, source: str) -> dict[str, Any]:
    try:
        saved = json.loads(text)
    except ValueError as error:
        _fail(f"{source}: not JSON ({error}): expected the output of `pulumi stack output --json`")
    if not isinstance(saved, dict):
        _fail(f"{source}: expected a JSON object of stack outputs, got {type(saved).__name__}")
    return saved


def _saved_outputs(spec: ClusterSpec) -> dict[str, Any]:
    """The stack's outputs: from the file named by $DEEPFLEET_OUTPUTS; else, when the spec
    needs them and the pulumi CLI is on PATH, from `pulumi stack output --json`; else none."""
    outputs = os.environ.get(OUTPUTS_VARIABLE)
    if outputs:
        try:
            text = Path(outputs).read_text(encoding="utf-8")
        except OSError as error:
            _fail(f"{OUTPUTS_VARIABLE}={outputs}: {error}")
        source = f"{OUTPUTS_VARIABLE}={outputs}"
        return _checked(spec, _parse_outputs(text, source), source)
    stack = stack_name(spec)
    explicit = bool(os.environ.get(STACK_VARIABLE))
    if stack is None or not (explicit or _needs_outputs(spec)):
        return {}
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        if explicit:
            _fail(
                f"{STACK_VARIABLE}={stack} but the pulumi CLI is not on PATH: install it "
                f"(https://www.pulumi.com/docs/install/), or save the outputs elsewhere with "
                f"`pulumi stack output --json --stack {stack} > outputs.json` and set "
                f"{OUTPUTS_VARIABLE}=outputs.json"
            )
        return {}
    source = f"pulumi stack {stack}"
    return _checked(spec, _parse_outputs(_stack_output_text(pulumi, stack), source), source)


def _checked(spec: ClusterSpec, saved: dict[str, Any], source: str) -> dict[str, Any]:
    """Outputs of another spec's stack would hand pyinfra wrong hosts: refuse them."""
    known = {n.name for n in spec.nodes}
    strangers = sorted(set(saved.get("node_addresses", {})) - known)
    if strangers:
        _fail(
            f"{source}: outputs name nodes that spec {spec.name} lacks ({', '.join(strangers)}): "
            f"they belong to another stack; name the spec's stack with {STACK_VARIABLE}=<stack> "
            f"or point {OUTPUTS_VARIABLE} at its outputs"
        )
    return saved


def node_addresses(spec: ClusterSpec, saved: dict[str, Any] | None = None) -> dict[str, str]:
    """Every node's address: the spec's, or Pulumi's outputs for cloud nodes."""
    saved = _saved_outputs(spec) if saved is None else saved
    addresses = {n.name: str(n.address) for n in spec.nodes if n.address is not None}
    addresses.update({k: str(v) for k, v in saved.get("node_addresses", {}).items()})
    return addresses


def connection_data(spec: ClusterSpec, address: str) -> dict[str, Any]:
    ssh = spec.site.ssh
    data: dict[str, Any] = {"ssh_hostname": address, "ssh_user": ssh.user, "ssh_port": ssh.port}
    if ssh.key_file:
        key = Path(ssh.key_file).expanduser()
        data["ssh_key"] = str(key if key.is_absolute() else PROJECT_DIR / key)
    if spec.is_lab:
        # Lab nodes are re-created with fresh host keys on every `lab up`.
        data["ssh_strict_host_key_checking"] = "no"
        data["ssh_known_hosts_file"] = "/dev/null"
    if ssh.user != "root":
        data["_sudo"] = True
    return data


def inventory_groups(spec: ClusterSpec) -> dict[str, list[HostEntry]]:
    saved = _saved_outputs(spec)
    addresses = node_addresses(spec, saved)
    # Cloud file systems get their DNS names from Pulumi (roles/model_storage.py reads these).
    mount_targets = (
        {"storage_mount_targets": saved["storage_mount_targets"]}
        if saved.get("storage_mount_targets")
        else {}
    )
    missing = [n.name for n in spec.nodes if n.name not in addresses]
    if missing:
        _fail(
            f"no address for {', '.join(missing)}: run `pulumi up`, then either put the pulumi "
            f"CLI on PATH (stack {stack_name(spec) or '<none>'}; {STACK_VARIABLE} names another) "
            f"or save the outputs with `pulumi stack output --json > outputs.json` and set "
            f"{OUTPUTS_VARIABLE}=outputs.json"
        )
    return {
        group: [
            (n.name, {**connection_data(spec, addresses[n.name]), **mount_targets})
            for n in spec.nodes_in(group)
        ]
        for group in GROUPS
    }
