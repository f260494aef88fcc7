from __future__ import annotations

from infra.spec_docs import render
from tests.conftest import PROJECT


def test_spec_reference_is_current() -> None:
    committed = (PROJECT / "docs" / "spec.md").read_text()
    assert committed == render(), "regenerate: python -m infra.spec_docs > docs/spec.md"
