"""Spec rules that need the model catalog: does each deployment fit the GPUs it is given?

Kept apart from `infra.spec_rules` so the plain structural rules stay free of the catalogs;
importing this module registers its rules.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING

from infra.errors import UserError
from infra.gpus import (
    CATALOG,
    CLI_UNLISTED_HINT,
    GpuMemoryMismatch,
    GpuModel,
    declared_gpu,
)
from infra.models import ModelArch, resolve_model
from infra.sizing import DEFAULT_CONTEXT, SizingReport, check_deployment_fits
from infra.spec_rules import Violation, rule

if TYPE_CHECKING:
    from infra.spec import ClusterSpec, Deployment, Gpus, Node


def node_gpu(gpus: Gpus) -> GpuModel:
    """The GPU a node's `gpus:` section declares, memory_gb included (see
    `infra.gpus.declared_gpu`). Raises UserError where `gpus_are_known` reports a violation."""
    return declared_gpu(gpus.model, gpus.memory_gb)


SPEC_UNLISTED_HINT = " (or set memory_gb to size a card the catalog lacks)"


def _catalog_model(spec: ClusterSpec, deployment: Deployment) -> ModelArch | None:
    names = [m.name for m in spec.models]
    if deployment.model not in names:
        return None  # reported by the structural rules
    try:
        return resolve_model(spec.model(deployment.model).source)
    except UserError:
        return None  # not in the catalog: the engine reads its config.json on the node


def replica_sizing(
    spec: ClusterSpec, deployment: Deployment, replica: list[str]
) -> SizingReport | None:
    """The sizing report for one replica, or None when it cannot be judged offline."""
    arch = _catalog_model(spec, deployment)
    names = {n.name: n for n in spec.nodes}
    nodes: list[Node] = [names[n] for n in replica if n in names]
    if arch is None or spec.lab is not None or len(nodes) != len(replica):
        return None
    gpus = nodes[0].gpus
    if gpus is None:
        return None
    try:
        gpu = node_gpu(gpus)
    except UserError:
        return None  # reported by gpus_are_known
    return check_deployment_fits(
        arch,
        gpu,
        gpus_per_node=gpus.count,
        nodes_per_replica=len(nodes),
        tp=deployment.parallelism.tp,
        dtype=spec.model(deployment.model).dtype,
        context=deployment.context_length or DEFAULT_CONTEXT,
    )


@rule
def gpus_are_known(spec: ClusterSpec) -> Iterator[Violation]:
    for i, node in enumerate(spec.nodes):
        if node.gpus is None:
            continue
        try:
            node_gpu(node.gpus)
        except GpuMemoryMismatch as error:
            problem = error.problems[0]
            yield Violation(("nodes", i, "gpus", "memory_gb"), problem.message, problem.hint)
        except UserError as error:
            hint = error.problems[0].hint if error.problems else None
            # The catalog's hint names the CLI flag; in a spec, memory_gb does that job.
            hint = (hint or "").replace(CLI_UNLISTED_HINT, SPEC_UNLISTED_HINT)
            yield Violation(
                ("nodes", i, "gpus", "model"),
                f"{error.title} {node.gpus.model!r}",
                hint or "see infra/gpus.py for the GPU catalog",
            )


@rule
def deployments_fit(spec: ClusterSpec) -> Iterator[Violation]:
    for i, deployment in enumerate(spec.deployments):
        arch = _catalog_model(spec, deployment)
        if arch is None:
            continue
        tp = deployment.parallelism.tp
        if arch.num_attention_heads % tp:
            yield Violation(
                ("deployments", i, "parallelism", "tp"),
                f"tp {tp} does not divide {arch.name}'s {arch.num_attention_heads} attention heads",
                "choose a tp that divides the head count (SGLang splits heads across GPUs)",
            )
            continue
        for r, replica in enumerate(deployment.replicas):
            report = replica_sizing(spec, deployment, replica)
            if report is None or report.fits:
                continue
            yield Violation(
                ("deployments", i, "replicas", r),
                f"{arch.name} does not fit replica {r + 1}: {report.reason}",
                f"`{_size_command(spec, arch, replica[0], report)}` shows what would",
            )


def _size_command(spec: ClusterSpec, arch: ModelArch, node: str, report: SizingReport) -> str:
    """The `deepfleet size` line that sizes the same model on the same GPUs as the spec."""
    gpus = spec.node(node).gpus
    if gpus is None:  # not reached: replica_sizing needs gpus
        return f"deepfleet size --model {arch.hf_id} --gpu {report.gpu}"
    command = f"deepfleet size --model {arch.hf_id} --gpu {shlex.quote(gpus.model)}"
    if gpus.memory_gb is not None and node_gpu(gpus) not in CATALOG:
        command += f" --gpu-memory {gpus.memory_gb:g}"
    return command + f" --gpus-per-node {gpus.count}"
