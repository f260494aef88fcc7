"""Repository-wide checks: templates parse, shell scripts pass shellcheck, no key material."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from infra.render import FILES_DIR, environment
from tests.conftest import PROJECT

TEMPLATES = sorted(p.relative_to(FILES_DIR).as_posix() for p in FILES_DIR.rglob("*.j2"))
GOLDEN = PROJECT / "tests" / "golden"


def _tracked_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [PROJECT / n for n in names]


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_parses(template: str) -> None:
    environment().get_template(template)


def _shell_scripts() -> list[Path]:
    scripts = [PROJECT / "bootstrap.sh", PROJECT / ".ci" / "run"]
    for path in sorted(GOLDEN.rglob("*")):
        if path.is_file() and path.read_text(errors="replace").startswith(
            ("#!/bin/sh", "#!/usr/bin/env bash", "#!/bin/bash")
        ):
            scripts.append(path)
    return scripts


@pytest.mark.validators
@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(PROJECT)))
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    result = subprocess.run(
        ["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


# Test fixtures that carry an obviously fake key on purpose.
KEY_ALLOWED = {"tests/test_pulumi.py"}


def test_no_private_key_material_is_committed() -> None:
    marker = "PRIVATE KEY" + "-----"
    offenders = [
        str(p.relative_to(PROJECT))
        for p in _tracked_files()
        if p.is_file()
        and str(p.relative_to(PROJECT)) not in KEY_ALLOWED
        and marker in p.read_text(errors="replace")
    ]
    assert offenders == []
