"""Golden files: everything the roles render for every example spec, committed and checked.

Regenerate after an intended change with `UPDATE_GOLDEN=1 pytest tests/test_golden.py` and
review the diff like any other change. Each file is also fed to the real program that reads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from infra.plan import plan_cluster, write_plan
from infra.spec import load_spec
from infra.validators import check_host_files
from tests.conftest import EXAMPLE_SPECS

GOLDEN = Path(__file__).parent / "golden"


def _rendered(spec_path: Path, tmp_path: Path) -> Path:
    out = tmp_path / spec_path.stem
    write_plan(plan_cluster(load_spec(spec_path)), out)
    return out


def _tree(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_rendered_files_match_golden(spec_path: Path, tmp_path: Path) -> None:
    rendered = _rendered(spec_path, tmp_path)
    golden = GOLDEN / spec_path.stem
    if os.environ.get("UPDATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        if rendered.exists():
            shutil.copytree(rendered, golden)
    actual, expected = _tree(rendered), _tree(golden)
    assert sorted(actual) == sorted(expected), "files added or removed: run with UPDATE_GOLDEN=1"
    for name, content in actual.items():
        assert content == expected[name], f"{name} differs from tests/golden (UPDATE_GOLDEN=1)"


@pytest.mark.validators
@pytest.mark.parametrize("spec_path", EXAMPLE_SPECS, ids=lambda p: p.stem)
def test_real_tools_accept_rendered_files(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    for node_plan in plan_cluster(spec):
        files = [f for role in node_plan.roles for f in role.files]
        check_host_files(files)
