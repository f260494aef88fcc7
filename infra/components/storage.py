"""AWS shared storage for the model weights: FSx for Lustre (`fsx-lustre`) or EFS (`efs`).

Only the GPU nodes mount it. Its security group admits the file-system ports from the GPU
nodes' security group, not from a subnet: the private subnet also holds the load-balancer and
monitoring instances and the NLB, which must not reach the weights.

FSx for Lustre follows AWS's "File system access control with Amazon VPC" (FSx for Lustre User
Guide): TCP 988 and 1018-1023 in both directions between the file system's group and itself
(its servers talk to each other) and between it and the clients' group. Lustre servers open
connections to clients too, so this component also adds those ports, from the file system's
group only, to the clients' group; the clients' group already sends anything out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pulumi
import pulumi_aws as aws

from infra.components._common import child, egress, egress_all, ingress, tags, token

LUSTRE_PORTS: tuple[tuple[int, int], ...] = ((988, 988), (1018, 1023))
NFS_PORT = 2049


@dataclass(frozen=True)
class SharedStorageArgs:
    cluster: str
    kind: Literal["fsx-lustre", "efs"]
    vpc_id: pulumi.Input[str]
    vpc_cidr: str
    subnet_ids: Sequence[pulumi.Input[str]]
    # The GPU nodes' security group: the only clients.
    client_security_group_id: pulumi.Input[str]
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
            # Kept as first written ("subnets"): a new description replaces the group, and with it
            # the file system, whose security groups cannot change in place.
            description=f"deepfleet {args.kind} storage: mounts from the GPU subnets only",
            tags=tags(c, f"{name}-sg"),
            opts=child(self),
        )
        sg = self.security_group.id
        clients = args.client_security_group_id
        peers: list[tuple[str, pulumi.Input[str], str]] = [
            ("self", sg, "the file servers"),
            ("gpu", clients, "the GPU nodes"),
        ]
        if args.kind == "fsx-lustre":
            for low, high in LUSTRE_PORTS:
                ports = f"{low}-{high}" if high != low else str(low)
                for peer_name, peer, who in peers:
                    ingress(
                        self,
                        f"{name}-{peer_name}-{low}",
                        sg,
                        description=f"Lustre TCP {ports} from {who}",
                        from_port=low,
                        to_port=high,
                        source_security_group_id=peer,
                        cluster=c,
                    )
                    egress(
                        self,
                        f"{name}-to-{peer_name}-{low}",
                        sg,
                        description=f"Lustre TCP {ports} to {who}",
                        from_port=low,
                        to_port=high,
                        destination_security_group_id=peer,
                        cluster=c,
                    )
                ingress(
                    self,
                    f"{name}-client-{low}",
                    clients,
                    description=f"Lustre TCP {ports} from the {args.kind} file servers",
                    from_port=low,
                    to_port=high,
                    source_security_group_id=sg,
                    cluster=c,
                )
        else:
            ingress(
                self,
                f"{name}-gpu-{NFS_PORT}",
                sg,
                description=f"NFS TCP {NFS_PORT} from the GPU nodes",
                from_port=NFS_PORT,
                source_security_group_id=clients,
                cluster=c,
            )
            # EFS mount targets only answer (security groups are stateful); unchanged from the
            # first version, which allowed egress within the VPC.
            egress_all(self, f"{name}-egress", sg, args.vpc_cidr, c)
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
