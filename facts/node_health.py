"""Fact `NodeHealth`: the raw outputs `deepfleet check` judges, read by pyinfra on the node.

The command is `infra.check.probe_script(...)` (read-only probes: nvidia-smi, NVLink, fabric
manager, kernel log XIDs, ibstat, the time service, name resolution, model files and checksums,
the engines' /health_generate); `process` splits its output into sections. Judge them with the
pure `infra.check.node_ready(spec, node, sections)`, e.g. in the sglang role before a node joins
the load balancer (at execution time, inside `python.call`, so that the probe sees the node as
the deploy left it):

    sections = host.get_fact(NodeHealth, script=probe_script(expectations(spec, node)))
    verdict = node_ready(spec, node, sections)
    if not verdict.passed: ...  # verdict.failures say what and how to fix it
"""

from __future__ import annotations

from pyinfra.api.facts import FactBase

from infra.check import Section, parse_sections


class NodeHealth(FactBase[dict[str, Section]]):
    """Probe sections by name; the script always exits 0, so a failed probe is data."""

    def command(self, script: str) -> str:
        return script

    def process(self, output: list[str]) -> dict[str, Section]:
        return parse_sections(output)
