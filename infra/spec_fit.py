"""Spec rules that need the model catalog: does each deployment fit the GPUs it is given?

Kept apart from `infra.spec_rules` so the plain structural rules stay free of the catalogs;
importing this module registers its rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from infra.errors import UserError
from infra.gpus import resolve_gpu
from infra.models import ModelArch, resolve_model
from infra.sizing import DEFAULT_CONTEXT, SizingReport, check_deployment_fits
from infra.spec_rules import Violation, rule

if TYPE_CHECKING:
    from infra.spec import ClusterSpec, Deployment, Node


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
        gpu = resolve_gpu(gpus.model)
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
            resolve_gpu(node.gpus.model)
        except UserError as error:
            hint = (error.problems[0].hint or "") if error.problems else ""
            # The catalog's hint also mentions a CLI flag; keep only the suggestion here.
            suggestion = hint.split(" (or give")[0] or None
            yield Violation(
                ("nodes", i, "gpus", "model"),
                f"unknown GPU model {node.gpus.model!r}",
                suggestion or "see infra/gpus.py for the GPU catalog",
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
                f"`deepfleet size --model {arch.hf_id} --gpu {report.gpu} "
                f"--gpus-per-node {report.gpus_per_node}` shows what would",
            )
