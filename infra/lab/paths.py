"""Where the lab keeps things: repo-local state in `.lab/`, bulky node data under /var."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST_ROOT = Path("/var/lib/deepfleet-lab")
DEFAULT_CACHE_ROOT = Path("/var/cache/deepfleet")


@dataclass(frozen=True)
class LabPaths:
    """`state` is the git-ignored `.lab/` of the checkout; `host_root` holds overlays.

    Overlay upper dirs live outside the checkout so that tools walking the repository never
    descend into a booted root filesystem.
    """

    state: Path = Path(".lab")
    host_root: Path = DEFAULT_HOST_ROOT
    cache_root: Path = DEFAULT_CACHE_ROOT

    @property
    def state_file(self) -> Path:
        return self.state / "state.json"

    @property
    def ssh_key(self) -> Path:
        return self.state / "ssh" / "id_ed25519"

    @property
    def api_key(self) -> Path:
        return self.state / "secrets" / "api-key"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def node_log(self, node: str) -> Path:
        return self.logs / f"{node}.log"

    @property
    def nodes_root(self) -> Path:
        return self.host_root / "nodes"

    def node_dir(self, node: str) -> Path:
        return self.nodes_root / node

    def node_root(self, node: str) -> Path:
        """The overlay's merged view: the directory systemd-nspawn boots."""
        return self.node_dir(node) / "root"

    def node_upper(self, node: str) -> Path:
        return self.node_dir(node) / "upper"

    def node_work(self, node: str) -> Path:
        return self.node_dir(node) / "work"

    def node_docker(self, node: str) -> Path:
        return self.node_dir(node) / "docker"

    @property
    def acng_dir(self) -> Path:
        """apt-cacher-ng's config and pid file (its cache lives in cache_root, kept on down)."""
        return self.host_root / "apt-cacher-ng"

    @property
    def acng_cache(self) -> Path:
        return self.cache_root / "apt-cacher-ng"
