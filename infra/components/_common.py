"""Small helpers shared by the components."""

from __future__ import annotations

from collections.abc import Mapping

import pulumi
import pulumi_aws as aws

TYPE_PREFIX = "deepfleet:infra"
ANYWHERE = "0.0.0.0/0"


def token(kind: str) -> str:
    """The type token of a deepfleet component, e.g. `deepfleet:infra:GpuHost`."""
    return f"{TYPE_PREFIX}:{kind}"


def tags(cluster: str, name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags every AWS resource carries: its name and the cluster it belongs to."""
    return {"Name": name, "deepfleet:cluster": cluster, **(extra or {})}


def child(
    parent: pulumi.Resource, depends_on: list[pulumi.Resource] | None = None
) -> pulumi.ResourceOptions:
    return pulumi.ResourceOptions(parent=parent, depends_on=depends_on)


def ingress(
    parent: pulumi.Resource,
    name: str,
    security_group_id: pulumi.Input[str],
    *,
    description: str,
    protocol: str = "tcp",
    from_port: int | None = None,
    to_port: int | None = None,
    cidr: str | None = None,
    source_security_group_id: pulumi.Input[str] | None = None,
    cluster: str,
) -> aws.vpc.SecurityGroupIngressRule:
    """One ingress rule: from a CIDR or from a security group, never both."""
    if (cidr is None) == (source_security_group_id is None):
        raise ValueError(f"{name}: give exactly one of cidr or source_security_group_id")
    return aws.vpc.SecurityGroupIngressRule(
        name,
        security_group_id=security_group_id,
        description=description,
        ip_protocol=protocol,
        from_port=from_port if protocol != "-1" else None,
        to_port=(to_port if to_port is not None else from_port) if protocol != "-1" else None,
        cidr_ipv4=cidr,
        referenced_security_group_id=source_security_group_id,
        tags=tags(cluster, name),
        opts=child(parent),
    )


def egress(
    parent: pulumi.Resource,
    name: str,
    security_group_id: pulumi.Input[str],
    *,
    description: str,
    from_port: int,
    to_port: int | None = None,
    destination_security_group_id: pulumi.Input[str],
    cluster: str,
) -> aws.vpc.SecurityGroupEgressRule:
    """One TCP egress rule to another security group (or the same one)."""
    return aws.vpc.SecurityGroupEgressRule(
        name,
        security_group_id=security_group_id,
        description=description,
        ip_protocol="tcp",
        from_port=from_port,
        to_port=to_port if to_port is not None else from_port,
        referenced_security_group_id=destination_security_group_id,
        tags=tags(cluster, name),
        opts=child(parent),
    )


def egress_all(
    parent: pulumi.Resource,
    name: str,
    security_group_id: pulumi.Input[str],
    cidr: str,
    cluster: str,
) -> aws.vpc.SecurityGroupEgressRule:
    return aws.vpc.SecurityGroupEgressRule(
        name,
        security_group_id=security_group_id,
        description=f"all egress to {cidr}",
        ip_protocol="-1",
        cidr_ipv4=cidr,
        tags=tags(cluster, name),
        opts=child(parent),
    )
