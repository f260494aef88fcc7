"""The bridge between a cluster spec and pyinfra: inventory groups and per-host connection data.

`inventory.py` and `deploy.py` at the top level are thin: they call into here, so the same spec
loading (and the same errors) serve the CLI and stock `pyinfra inventory.py deploy.py`.
"""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from infra.errors import UserError
from infra.spec import GROUPS, ClusterSpec, load_spec

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = "hosts/lab.yaml"
SPEC_VARIABLE = "DEEPFLEET_SPEC"
# Saved `pulumi stack output --json` for cloud nodes, whose addresses only Pulumi knows.
OUTPUTS_VARIABLE = "DEEPFLEET_OUTPUTS"

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


def _saved_outputs() -> dict[str, Any]:
    outputs = os.environ.get(OUTPUTS_VARIABLE)
    if not outputs:
        return {}
    try:
        saved: dict[str, Any] = json.loads(Path(outputs).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"error: {OUTPUTS_VARIABLE}={outputs}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return saved


def node_addresses(spec: ClusterSpec, saved: dict[str, Any] | None = None) -> dict[str, str]:
    """Every node's address: the spec's, or Pulumi's saved outputs for cloud nodes."""
    saved = _saved_outputs() if saved is None else saved
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
    saved = _saved_outputs()
    addresses = node_addresses(spec, saved)
    # Cloud file systems get their DNS names from Pulumi (roles/model_storage.py reads these).
    mount_targets = (
        {"storage_mount_targets": saved["storage_mount_targets"]}
        if saved.get("storage_mount_targets")
        else {}
    )
    missing = [n.name for n in spec.nodes if n.name not in addresses]
    if missing:
        print(
            f"error: no address for {', '.join(missing)}: run `pulumi up`, then save the outputs "
            f"with `pulumi stack output --json > outputs.json` and set {OUTPUTS_VARIABLE}=outputs.json",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return {
        group: [
            (n.name, {**connection_data(spec, addresses[n.name]), **mount_targets})
            for n in spec.nodes_in(group)
        ]
        for group in GROUPS
    }
