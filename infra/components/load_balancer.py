"""AWS load balancer: an internal network load balancer in the private subnet.

One target group per deployment (its replicas' rank-0 nodes on the engine port, health-checked
with HTTP GET /health on that port) and one TCP listener per deployment: the first deployment on
the spec's load-balancer port, the next ones on the following ports. The LB's security group
admits the listener ports only from `allowed_cidrs`; the targets' security group admits the
engine ports only from the LB's security group (load-balancer nodes carry it too, so HAProxy on
them reaches the engines as well).

Target groups are per deployment, not per replica: an NLB listener forwards to one target
group, so a group per replica would need a port per replica and leave replica choice to the
clients. Each replica's rank 0 is its own target, so health is still checked, and a failed
replica taken out, per replica (docs/pulumi.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.components._common import child, egress_all, ingress, tags, token

HEALTH_PATH = "/health"


@dataclass(frozen=True)
class TargetDeployment:
    name: str
    engine_port: int
    listen_port: int
    # Node name -> instance id of each replica's rank-0 node.
    targets: Mapping[str, pulumi.Input[str]]


@dataclass(frozen=True)
class LoadBalancerArgs:
    cluster: str
    vpc_id: pulumi.Input[str]
    vpc_cidr: str
    subnet_ids: Sequence[pulumi.Input[str]]
    allowed_cidrs: Sequence[str]
    deployments: Sequence[TargetDeployment]
    target_security_group_id: pulumi.Input[str]


class LoadBalancer(pulumi.ComponentResource):
    security_group: aws.ec2.SecurityGroup
    nlb: aws.lb.LoadBalancer
    target_groups: dict[str, aws.lb.TargetGroup]
    listeners: dict[str, aws.lb.Listener]
    endpoint: pulumi.Output[str]

    def __init__(
        self, name: str, args: LoadBalancerArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("LoadBalancer"), name, None, opts)
        c = args.cluster
        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description="deepfleet load balancer: API port from allowed client networks",
            tags=tags(c, f"{name}-sg"),
            opts=child(self),
        )
        sg = self.security_group.id
        for deployment in args.deployments:
            for i, cidr in enumerate(args.allowed_cidrs):
                ingress(
                    self,
                    f"{name}-{deployment.name}-api-{i}",
                    sg,
                    description=f"API port {deployment.listen_port} from {cidr}",
                    from_port=deployment.listen_port,
                    cidr=cidr,
                    cluster=c,
                )
        egress_all(self, f"{name}-egress", sg, args.vpc_cidr, c)
        for port in sorted({d.engine_port for d in args.deployments}):
            ingress(
                self,
                f"{name}-engine-{port}",
                args.target_security_group_id,
                description=f"engine port {port} from the load balancer only",
                from_port=port,
                source_security_group_id=sg,
                cluster=c,
            )
        self.nlb = aws.lb.LoadBalancer(
            f"{name}-nlb",
            internal=True,
            load_balancer_type="network",
            subnets=list(args.subnet_ids),
            security_groups=[sg],
            enable_cross_zone_load_balancing=True,
            tags=tags(c, f"{name}-nlb"),
            opts=child(self),
        )
        self.target_groups = {}
        self.listeners = {}
        for deployment in args.deployments:
            prefix = f"{name}-{deployment.name}"
            group = aws.lb.TargetGroup(
                f"{prefix}-tg",
                vpc_id=args.vpc_id,
                port=deployment.engine_port,
                protocol="TCP",
                target_type="instance",
                health_check=aws.lb.TargetGroupHealthCheckArgs(
                    enabled=True,
                    protocol="HTTP",
                    path=HEALTH_PATH,
                    port=str(deployment.engine_port),
                    matcher="200",
                    interval=30,
                    healthy_threshold=3,
                    unhealthy_threshold=3,
                ),
                tags=tags(c, f"{prefix}-tg", {"deepfleet:deployment": deployment.name}),
                opts=child(self),
            )
            self.target_groups[deployment.name] = group
            for node, instance_id in deployment.targets.items():
                aws.lb.TargetGroupAttachment(
                    f"{prefix}-{node}",
                    target_group_arn=group.arn,
                    target_id=instance_id,
                    port=deployment.engine_port,
                    opts=child(self),
                )
            self.listeners[deployment.name] = aws.lb.Listener(
                f"{prefix}-listener",
                load_balancer_arn=self.nlb.arn,
                port=deployment.listen_port,
                protocol="TCP",
                default_actions=[
                    aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=group.arn)
                ],
                tags=tags(c, f"{prefix}-listener"),
                opts=child(self),
            )
        first_port = args.deployments[0].listen_port if args.deployments else 0
        self.endpoint = self.nlb.dns_name.apply(lambda dns: f"{dns}:{first_port}")
        self.register_outputs(
            {
                "endpoint": self.endpoint,
                "security_group_id": sg,
                "listen_ports": {d.name: d.listen_port for d in args.deployments},
            }
        )
