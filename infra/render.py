"""Rendering: the jinja2 environment every template goes through, and the per-host plan types.

Roles compute what a host should have as plain data (`RolePlan`) from the spec alone, so that
`deepfleet plan`, `deepfleet diff` and the live deploy all use the very same rendered files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

FILES_DIR = Path(__file__).resolve().parent.parent / "files"


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(FILES_DIR),
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, never an empty string
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


@dataclass(frozen=True)
class HostFile:
    """A file a role owns on a host: its full content is decided offline."""

    path: str
    content: str
    mode: str = "644"
    user: str = "root"
    group: str = "root"


@dataclass
class RolePlan:
    """What one role will do on one host: files it writes and a reviewer-readable summary."""

    role: str
    summary: list[str] = field(default_factory=list)
    files: list[HostFile] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    # Why the role does nothing on this host (e.g. "lab: no GPUs"); None when it applies.
    skipped: str | None = None
