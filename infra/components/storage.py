"""AWS shared storage for the model weights: FSx for Lustre (`fsx-lustre`) or EFS (`efs`).

Its security group admits the file-system ports only from the GPU subnet(s); FSx for Lustre
also needs its own servers to talk to each other, so its group admits Lustre traffic from itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pulumi
import pulumi_aws as aws

from infra.components._common import child, egress_all, ingress, tags, token

LUSTRE_PORTS: tuple[tuple[int, int], ...] = ((988, 988), (1018, 1023))
NFS_PORT = 2049


@dataclass(frozen=True)
class SharedStorageArgs:
    cluster: str
    kind: Literal["fsx-lustre", "efs"]
    vpc_id: pulumi.Input[str]
    vpc_cidr: str
    subnet_ids: Sequence[pulumi.Input[str]]
    # The GPU subnets' CIDRs: the only clients.
    client_cidrs: Sequence[str]
    # FSx for Lustre only: capacity in GiB (1200 or a multiple of 2400 for PERSISTENT_2)
    # and throughput per TiB.
    capacity_gib: int = 2400
    throughput_mb_per_tib: int = 250


class SharedStorage(pulumi.ComponentResource):
    security_group: aws.ec2.SecurityGroup
    mount_target: pulumi.Output[str]

    def __init__(
        self, name: str, args: SharedStorageArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("SharedStorage"), name, None, opts)
        c = args.cluster
        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description=f"deepfleet {args.kind} storage: mounts from the GPU subnets only",
            tags=tags(c, f"{name}-sg"),
            opts=child(self),
        )
        sg = self.security_group.id
        egress_all(self, f"{name}-egress", sg, args.vpc_cidr, c)
        ranges = LUSTRE_PORTS if args.kind == "fsx-lustre" else ((NFS_PORT, NFS_PORT),)
        for low, high in ranges:
            for i, cidr in enumerate(args.client_cidrs):
                ingress(
                    self,
                    f"{name}-mount-{low}-{i}",
                    sg,
                    description=f"{args.kind} ports {low}-{high} from GPU subnet {cidr}",
                    from_port=low,
                    to_port=high,
                    cidr=cidr,
                    cluster=c,
                )
            if args.kind == "fsx-lustre":
                ingress(
                    self,
                    f"{name}-self-{low}",
                    sg,
                    description=f"Lustre ports {low}-{high} between the file servers",
                    from_port=low,
                    to_port=high,
                    source_security_group_id=sg,
                    cluster=c,
                )
        if args.kind == "fsx-lustre":
            lustre = aws.fsx.LustreFileSystem(
                f"{name}-lustre",
                storage_capacity=args.capacity_gib,
                subnet_ids=args.subnet_ids[0],  # one subnet per file system
                security_group_ids=[sg],
                deployment_type="PERSISTENT_2",
                per_unit_storage_throughput=args.throughput_mb_per_tib,
                file_system_type_version="2.15",
                data_compression_type="LZ4",
                tags=tags(c, f"{name}-lustre"),
                opts=child(self),
            )
            self.mount_target = pulumi.Output.concat(lustre.dns_name, "@tcp:/", lustre.mount_name)
        else:
            efs = aws.efs.FileSystem(
                f"{name}-efs",
                encrypted=True,
                performance_mode="generalPurpose",
                throughput_mode="elastic",
                tags=tags(c, f"{name}-efs"),
                opts=child(self),
            )
            for i, subnet_id in enumerate(args.subnet_ids):
                aws.efs.MountTarget(
                    f"{name}-mount-target-{i}",
                    file_system_id=efs.id,
                    subnet_id=subnet_id,
                    security_groups=[sg],
                    opts=child(self),
                )
            self.mount_target = pulumi.Output.concat(efs.dns_name, ":/")
        self.register_outputs({"mount_target": self.mount_target, "security_group_id": sg})
