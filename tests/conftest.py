from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
HOSTS = PROJECT / "hosts"
EXAMPLE_SPECS = sorted(HOSTS.glob("*.yaml"))


@pytest.fixture
def project_dir() -> Path:
    return PROJECT
