"""Operation tests: every role's data files (tests/operations/<role>/<case>.json, run by
tests/operations/harness.py): facts in, the exact commands per operation out. A new case is a
new file. After an intended change, `UPDATE_OPERATIONS=1 pytest tests/test_operations.py`
rewrites the expected commands; review the diff like any other change.
"""

from __future__ import annotations

import json
import os

import pytest
from pyinfra.api.exceptions import DeployError

from roles import container_runtime, mellanox, model_storage, nvidia_driver, timesync
from tests.operations.harness import CASES, Case, load_cases, run_case

ROLES = {
    "nvidia_driver": nvidia_driver,
    "container_runtime": container_runtime,
    "mellanox": mellanox,
    "model_storage": model_storage,
    "timesync": timesync,
}
ROLE_CASES = [(role, case) for role in ROLES for case in load_cases(role)]


@pytest.mark.parametrize(("role", "case"), ROLE_CASES, ids=[c.name for _, c in ROLE_CASES])
def test_operations(role: str, case: Case) -> None:
    if "raises" in case.data:
        # Refused before any operation is added (an unsupported OS): the deploy stops there.
        with pytest.raises(DeployError) as refused:
            run_case(case, ROLES[role])
        assert case.data["raises"] in str(refused.value)
        return
    result = run_case(case, ROLES[role])
    if os.environ.get("UPDATE_OPERATIONS"):
        case.data["commands"] = result.commands
        case.data["errors"] = result.errors
        case.path.write_text(json.dumps(case.data, indent=2) + "\n", encoding="utf-8")
    assert list(result.commands.items()) == list(case.data["commands"].items())
    assert result.failed == bool(case.data.get("errors")), result.errors
    assert result.errors == case.data.get("errors", [])
    for expected in case.data.get("warnings", []):
        assert any(expected in w for w in result.warnings), result.warnings
    for expected in case.data.get("notices", []):
        assert any(expected in n for n in result.notices), result.notices


def test_every_role_directory_is_run() -> None:
    directories = {p.name for p in CASES.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert directories == set(ROLES)
