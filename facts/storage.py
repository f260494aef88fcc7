"""Facts about model storage: how a path is mounted, and the state of the local model cache.

The cache manifest (documented in docs/node-roles.md) is a `SHA256SUMS` file at the top of each
model directory on the shared storage, in `sha256sum` output format: one `<sha256>  <path>` line
per file, paths relative to the model directory, the manifest itself excluded. The cache script
copies a model, checks every file against it and records the outcome in a status file
(`STATUS_FILE`) whose first line is `verified|failed <manifest sha256> <UTC time>`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Literal

from pyinfra.api.command import QuoteString, StringCommand
from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.facts import FactBase

STATUS_FILE = ".deepfleet-cache-status"
MANIFEST = "SHA256SUMS"


@dataclass(frozen=True)
class MountState:
    target: str
    source: str
    fstype: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def parse_findmnt_pairs(line: str) -> MountState:
    """One line of `findmnt -P -o TARGET,SOURCE,FSTYPE,OPTIONS` (KEY="value" pairs)."""
    pairs: dict[str, str] = {}
    for token in shlex.split(line):
        key, sep, value = token.partition("=")
        if not sep:
            raise FactProcessError(f"findmnt: not a KEY=value pair: {token!r} in {line!r}")
        pairs[key] = value
    missing = {"TARGET", "SOURCE", "FSTYPE", "OPTIONS"} - pairs.keys()
    if missing:
        raise FactProcessError(f"findmnt: missing {', '.join(sorted(missing))} in {line!r}")
    return MountState(
        target=pairs["TARGET"],
        source=pairs["SOURCE"],
        fstype=pairs["FSTYPE"],
        options=tuple(pairs["OPTIONS"].split(",")),
    )


class MountPoint(FactBase[MountState | None]):
    """What is mounted exactly at `path` (not a parent of it); None when nothing is."""

    def command(self, path: str) -> StringCommand:
        # findmnt exits 1 when nothing is mounted there: that is an answer, not an error.
        return StringCommand(
            "findmnt -P -o TARGET,SOURCE,FSTYPE,OPTIONS --mountpoint",
            QuoteString(path),
            "|| true",
        )

    def process(self, output: list[str]) -> MountState | None:
        lines = [line for line in output if line.strip()]
        return parse_findmnt_pairs(lines[0]) if lines else None


CacheState = Literal["verified", "failed", "stale", "missing", "no-manifest"]


@dataclass(frozen=True)
class CacheStatus:
    """One model's copy in the local cache, judged against the manifest on shared storage."""

    model_path: str
    state: CacheState
    manifest_sha256: str | None  # of the manifest on shared storage now
    checked_manifest_sha256: str | None  # of the manifest the copy was checked against
    checked_at: str | None

    def describe(self) -> str:
        when = f" at {self.checked_at}" if self.checked_at else ""
        return {
            "verified": f"{self.model_path}: verified against SHA256SUMS{when}",
            "failed": f"{self.model_path}: copy FAILED verification{when} (torn or corrupt)",
            "stale": f"{self.model_path}: cached copy checked{when} against an older SHA256SUMS",
            "missing": f"{self.model_path}: not cached yet",
            "no-manifest": f"{self.model_path}: no SHA256SUMS on the shared storage",
        }[self.state]


def parse_cache_line(line: str) -> CacheStatus:
    """`<model path>\\t<status line or '-'>\\t<manifest sha256 or '-'>` (see ModelCache)."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 3:
        raise FactProcessError(f"model cache: expected 3 tab-separated fields in {line!r}")
    path, status, manifest = parts
    current = manifest.split()[0] if manifest.strip() not in ("", "-") else None
    words = status.split() if status.strip() not in ("", "-") else []
    outcome = words[0] if words else None
    checked = words[1] if len(words) > 1 else None
    at = words[2] if len(words) > 2 else None
    state: CacheState
    if current is None:
        state = "no-manifest"
    elif outcome == "failed":
        state = "failed"
    elif outcome == "verified":
        state = "verified" if checked == current else "stale"
    elif outcome is None:
        state = "missing"
    else:
        raise FactProcessError(f"model cache: unknown status {status!r} for {path}")
    return CacheStatus(path, state, current, checked, at)


class ModelCache(FactBase[list[CacheStatus]]):
    """The status of each model's copy under `cache_dir`, against `<source_dir>/<path>/SHA256SUMS`.

    Reads two small files per model; never hashes model data (that is the cache script's job).
    """

    @staticmethod
    def default() -> list[CacheStatus]:
        return []

    def command(self, source_dir: str, cache_dir: str, model_paths: list[str]) -> str:
        lines = []
        for path in model_paths:
            copy = shlex.quote(f"{cache_dir}/{path}")
            partial = shlex.quote(f"{cache_dir}/{path}.partial")
            manifest = shlex.quote(f"{source_dir}/{path}/{MANIFEST}")
            lines.append(
                f"printf '%s\\t%s\\t%s\\n' {shlex.quote(path)} "
                f'"$(head -n1 {copy}/{STATUS_FILE} 2>/dev/null '
                f'|| head -n1 {partial}/{STATUS_FILE} 2>/dev/null || echo -)" '
                f'"$(sha256sum < {manifest} 2>/dev/null || echo -)"'
            )
        return "; ".join(lines) if lines else "true"

    def process(self, output: list[str]) -> list[CacheStatus]:
        return [parse_cache_line(line) for line in output if line.strip()]
