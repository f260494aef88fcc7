"""AWS NAT gateway: an Elastic IP, the gateway in the public subnet, and the private route
table's default route (0.0.0.0/0) through it, so private instances reach apt, registries and
Hugging Face without being reachable from outside."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.components._common import ANYWHERE, child, tags, token


@dataclass(frozen=True)
class NatGatewayArgs:
    cluster: str
    public_subnet_id: pulumi.Input[str]
    private_route_table_id: pulumi.Input[str]


class NatGateway(pulumi.ComponentResource):
    eip: aws.ec2.Eip
    gateway: aws.ec2.NatGateway
    route: aws.ec2.Route

    def __init__(
        self, name: str, args: NatGatewayArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("NatGateway"), name, None, opts)
        c = args.cluster
        self.eip = aws.ec2.Eip(
            f"{name}-eip", domain="vpc", tags=tags(c, f"{name}-eip"), opts=child(self)
        )
        self.gateway = aws.ec2.NatGateway(
            f"{name}-gw",
            allocation_id=self.eip.allocation_id,
            subnet_id=args.public_subnet_id,
            connectivity_type="public",
            tags=tags(c, f"{name}-gw"),
            opts=child(self),
        )
        self.route = aws.ec2.Route(
            f"{name}-private-default",
            route_table_id=args.private_route_table_id,
            destination_cidr_block=ANYWHERE,
            nat_gateway_id=self.gateway.id,
            opts=child(self),
        )
        self.register_outputs({"public_ip": self.eip.public_ip, "nat_gateway_id": self.gateway.id})
