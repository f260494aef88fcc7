"""AWS network: a VPC with one public and one private subnet in one availability zone.

The public subnet holds only the NAT gateway; every instance, the load balancer and the shared
storage live in the private subnet. The private route table gets its default route from
`NatGateway`, which is built on top of this component.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.components._common import ANYWHERE, child, tags, token


@dataclass(frozen=True)
class NetworkArgs:
    cluster: str
    vpc_cidr: str
    public_subnet_cidr: str
    private_subnet_cidr: str
    availability_zone: str


class Network(pulumi.ComponentResource):
    vpc: aws.ec2.Vpc
    public_subnet: aws.ec2.Subnet
    private_subnet: aws.ec2.Subnet
    internet_gateway: aws.ec2.InternetGateway
    public_route_table: aws.ec2.RouteTable
    private_route_table: aws.ec2.RouteTable

    def __init__(
        self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("Network"), name, None, opts)
        self.args = args
        c = args.cluster
        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.vpc_cidr,
            enable_dns_support=True,
            enable_dns_hostnames=True,
            tags=tags(c, f"{name}-vpc"),
            opts=child(self),
        )
        self.public_subnet = aws.ec2.Subnet(
            f"{name}-public",
            vpc_id=self.vpc.id,
            cidr_block=args.public_subnet_cidr,
            availability_zone=args.availability_zone,
            map_public_ip_on_launch=False,
            tags=tags(c, f"{name}-public", {"deepfleet:tier": "public"}),
            opts=child(self),
        )
        self.private_subnet = aws.ec2.Subnet(
            f"{name}-private",
            vpc_id=self.vpc.id,
            cidr_block=args.private_subnet_cidr,
            availability_zone=args.availability_zone,
            map_public_ip_on_launch=False,
            tags=tags(c, f"{name}-private", {"deepfleet:tier": "private"}),
            opts=child(self),
        )
        self.internet_gateway = aws.ec2.InternetGateway(
            f"{name}-igw", vpc_id=self.vpc.id, tags=tags(c, f"{name}-igw"), opts=child(self)
        )
        self.public_route_table = aws.ec2.RouteTable(
            f"{name}-public-rt",
            vpc_id=self.vpc.id,
            tags=tags(c, f"{name}-public-rt"),
            opts=child(self),
        )
        aws.ec2.Route(
            f"{name}-public-default",
            route_table_id=self.public_route_table.id,
            destination_cidr_block=ANYWHERE,
            gateway_id=self.internet_gateway.id,
            opts=child(self),
        )
        aws.ec2.RouteTableAssociation(
            f"{name}-public-rta",
            route_table_id=self.public_route_table.id,
            subnet_id=self.public_subnet.id,
            opts=child(self),
        )
        self.private_route_table = aws.ec2.RouteTable(
            f"{name}-private-rt",
            vpc_id=self.vpc.id,
            tags=tags(c, f"{name}-private-rt"),
            opts=child(self),
        )
        aws.ec2.RouteTableAssociation(
            f"{name}-private-rta",
            route_table_id=self.private_route_table.id,
            subnet_id=self.private_subnet.id,
            opts=child(self),
        )
        self.register_outputs(
            {
                "vpc_id": self.vpc.id,
                "public_subnet_id": self.public_subnet.id,
                "private_subnet_id": self.private_subnet.id,
                "private_route_table_id": self.private_route_table.id,
            }
        )
