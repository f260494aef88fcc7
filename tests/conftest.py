from __future__ import annotations

from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
HOSTS = PROJECT / "hosts"
EXAMPLE_SPECS = sorted(HOSTS.glob("*.yaml"))
LAYOUTS = PROJECT / "tests/fixtures/sglang/cluster.yaml"
PD_DEPLOYMENT = """\
  - name: r1-pd
    model: deepseek-r1
    replicas: [[h200-03], [h200-04]]
    parallelism: {tp: 8}
    disaggregation: {prefill_replicas: [1]}
    image: lmsysorg/sglang:v0.5.23-cu129
    api_key: {env: DEEPFLEET_API_KEY}
"""


def pd_layout_text() -> str:
    """The layouts fixture's nodes serving one prefill/decode deployment behind smg, instead of
    its plain deployments (one smg routes either prefill/decode pairs or plain workers)."""
    text = LAYOUTS.read_text(encoding="utf-8")
    head, rest = text.split("\ndeployments:\n", 1)
    lb = rest[rest.index("\nload_balancer:\n") :]
    lb = lb.replace("\nload_balancer:\n", "\nload_balancer:\n  router: haproxy+smg\n", 1)
    return f"{head}\ndeployments:\n{PD_DEPLOYMENT}{lb}"


@pytest.fixture
def project_dir() -> Path:
    return PROJECT
