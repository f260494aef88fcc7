"""AWS instances: GPU nodes (`GpuNodePool` of `GpuHost`s) and the other nodes of the spec
(`ServicePool` of `ServiceHost`s: load balancer, monitoring, ...).

Every instance sits in the private subnet without a public address. GPU nodes share one
security group: SSH only from the site's admin networks and all traffic within the group itself
(NCCL and EFA need it); the engine ports are opened by `LoadBalancer`, from its own group only.
With `efa`, the pool's launch template carries one EFA interface per network card of the
instance type (`EFA_INTERFACES`), all in the private subnet with no public address. The nodes of
a multi-node replica share one cluster placement group.

Types with local NVMe instance store (`INSTANCE_STORE_DRIVES`) get user data that makes one
ext4 file system of those drives (RAID0 when several) and mounts it at `nvme_mount`, the spec's
model cache (`storage[].local_cache`): see `gpu_user_data` and docs/pulumi.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_aws as aws
import yaml

from infra.components._common import ANYWHERE, child, egress_all, ingress, tags, token

# Network cards (hence EFA interfaces) per instance type, from the EC2 EFA documentation.
# Types not listed get one EFA interface.
EFA_INTERFACES: Mapping[str, int] = {
    "p4d.24xlarge": 4,
    "p4de.24xlarge": 4,
    "p5.48xlarge": 32,
    "p5e.48xlarge": 32,
    "p5en.48xlarge": 16,
}
SERVICE_ROOT_VOLUME_GB = 100

# Local NVMe instance-store drives per instance type, from the EC2 instance-type pages. Types
# not listed get no NVMe preparation.
INSTANCE_STORE_DRIVES: Mapping[str, int] = {
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.48xlarge": 8,
    "p5e.48xlarge": 8,
    "p5en.48xlarge": 8,
}
# Where the instance store is mounted when the spec names no local_cache.
DEFAULT_NVME_MOUNT = "/nvme"
NVME_SCRIPT = Path(__file__).with_name("nvme-raid.sh")
NVME_SCRIPT_PATH = "/usr/local/sbin/deepfleet-nvme-raid"
NVME_SERVICE = "deepfleet-nvme-raid.service"
NVME_LABEL = "deepfleet-nvme"
UNIT_DIR = "/etc/systemd/system"
_UNESCAPED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def mount_unit_name(path: str) -> str:
    """systemd's name for the mount unit of `path` (`systemd-escape --path --suffix=mount`): a
    .mount unit only loads under the name that its Where= escapes to."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-.mount"
    escaped = "".join(
        "-"
        if char == "/"
        else char
        if char in _UNESCAPED and not (i == 0 and char == ".")
        else "".join(f"\\x{byte:02x}" for byte in char.encode())
        for i, char in enumerate(trimmed)
    )
    return f"{escaped}.mount"


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the user data reads like the files it writes."""


_BlockDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def _cloud_config(hostname: str) -> str:
    return f"#cloud-config\nhostname: {hostname}\npreserve_hostname: false\n"


def gpu_user_data(hostname: str, drives: int, mount: str) -> str:
    """Cloud-config for a GPU instance: its hostname and, with instance-store `drives`, the
    script, service and mount unit that put them together at `mount` on every boot.

    The mount is a systemd unit, not a one-off `mount`, so that the model cache unit's
    `RequiresMountsFor=<local_cache>` (roles/model_storage.py) waits for it and never fills
    the root volume under an empty mount point.
    """
    if drives == 0:
        return _cloud_config(hostname)
    mount_unit = mount_unit_name(mount)
    service = (
        "[Unit]\n"
        "Description=Make one ext4 file system of the instance-store NVMe drives\n"
        # Early boot, without default dependencies: some systemd versions order a local mount
        # before local-fs.target even with nofail, and a service after sysinit.target would
        # then make a cycle. It needs only udev and the drives.
        "DefaultDependencies=no\n"
        "After=systemd-udev-trigger.service systemd-remount-fs.service local-fs-pre.target\n"
        f"Before={mount_unit} shutdown.target\n"
        "Conflicts=shutdown.target\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart={NVME_SCRIPT_PATH} {drives}\n"
    )
    mount_text = (
        "[Unit]\n"
        f"Description=Instance-store NVMe RAID0 at {mount} (model cache)\n"
        f"Requires={NVME_SERVICE}\n"
        f"After={NVME_SERVICE}\n"
        "\n"
        "[Mount]\n"
        f"What=/dev/disk/by-label/{NVME_LABEL}\n"
        f"Where={mount}\n"
        "Type=ext4\n"
        # nofail: an instance whose drives are missing still boots, and is reachable to debug.
        "Options=noatime,nofail\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
    config = {
        "hostname": hostname,
        "preserve_hostname": False,
        "write_files": [
            {"path": NVME_SCRIPT_PATH, "permissions": "0755", "content": NVME_SCRIPT.read_text()},
            {"path": f"{UNIT_DIR}/{NVME_SERVICE}", "permissions": "0644", "content": service},
            {"path": f"{UNIT_DIR}/{mount_unit}", "permissions": "0644", "content": mount_text},
        ],
        # First boot: systemd read its units before cloud-init wrote these. Later boots start
        # the mount (and so the service) from multi-user.target.
        "runcmd": [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", mount_unit],
        ],
    }
    return "#cloud-config\n" + yaml.dump(
        config, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=100
    )


@dataclass(frozen=True)
class GpuHostArgs:
    cluster: str
    node: str
    instance_type: str
    ami: str
    key_name: str
    root_volume_gb: int
    subnet_id: pulumi.Input[str]
    security_group_ids: Sequence[pulumi.Input[str]]
    launch_template_id: pulumi.Input[str] | None = None
    placement_group: pulumi.Input[str] | None = None
    # Instance-store NVMe drives of the type (`INSTANCE_STORE_DRIVES`) and where they go.
    nvme_drives: int = 0
    nvme_mount: str = DEFAULT_NVME_MOUNT


class GpuHost(pulumi.ComponentResource):
    instance: aws.ec2.Instance
    private_ip: pulumi.Output[str]

    def __init__(
        self, name: str, args: GpuHostArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("GpuHost"), name, None, opts)
        # With a launch template, its EFA interfaces carry the subnet, the security group and
        # "no public address"; without one the instance states them itself.
        template = args.launch_template_id
        direct = template is None
        self.instance = aws.ec2.Instance(
            f"{name}-instance",
            ami=args.ami,
            instance_type=args.instance_type,
            key_name=args.key_name,
            placement_group=args.placement_group,
            launch_template=None
            if template is None
            else aws.ec2.InstanceLaunchTemplateArgs(id=template, version="$Latest"),
            subnet_id=args.subnet_id if direct else None,
            vpc_security_group_ids=list(args.security_group_ids) if direct else None,
            associate_public_ip_address=False if direct else None,
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_size=args.root_volume_gb, volume_type="gp3", encrypted=True
            ),
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_tokens="required", http_endpoint="enabled"
            ),
            user_data=gpu_user_data(args.node, args.nvme_drives, args.nvme_mount),
            tags=tags(args.cluster, args.node, {"deepfleet:group": "gpu"}),
            opts=child(self),
        )
        self.private_ip = self.instance.private_ip
        self.register_outputs({"private_ip": self.private_ip, "instance_id": self.instance.id})


@dataclass(frozen=True)
class GpuNodePoolArgs:
    cluster: str
    nodes: Sequence[str]
    vpc_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]
    instance_type: str
    ami: str
    key_name: str
    root_volume_gb: int
    admin_cidrs: Sequence[str]
    ssh_port: int = 22
    efa: bool = True
    # Placement group key -> the nodes of one multi-node replica.
    placement_groups: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Mount point of the instance-store NVMe file system (types in INSTANCE_STORE_DRIVES).
    nvme_mount: str = DEFAULT_NVME_MOUNT


class GpuNodePool(pulumi.ComponentResource):
    security_group: aws.ec2.SecurityGroup
    launch_template: aws.ec2.LaunchTemplate | None
    placement_groups: dict[str, aws.ec2.PlacementGroup]
    hosts: dict[str, GpuHost]

    def __init__(
        self, name: str, args: GpuNodePoolArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("GpuNodePool"), name, None, opts)
        c = args.cluster
        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description="deepfleet GPU nodes: SSH from admins, all traffic within the group",
            tags=tags(c, f"{name}-sg"),
            opts=child(self),
        )
        sg = self.security_group.id
        for i, cidr in enumerate(args.admin_cidrs):
            ingress(
                self,
                f"{name}-ssh-{i}",
                sg,
                description=f"SSH from admin network {cidr}",
                from_port=args.ssh_port,
                cidr=cidr,
                cluster=c,
            )
        ingress(
            self,
            f"{name}-fabric",
            sg,
            description="NCCL/EFA: all traffic within the GPU group",
            protocol="-1",
            source_security_group_id=sg,
            cluster=c,
        )
        egress_all(self, f"{name}-egress", sg, ANYWHERE, c)
        self.launch_template = None
        if args.efa:
            cards = EFA_INTERFACES.get(args.instance_type, 1)
            self.launch_template = aws.ec2.LaunchTemplate(
                f"{name}-efa-lt",
                description=f"{cards} EFA interface(s) for {args.instance_type}",
                network_interfaces=[
                    aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                        device_index=0 if card == 0 else 1,
                        network_card_index=card,
                        interface_type="efa",
                        subnet_id=args.subnet_id,
                        security_groups=[sg],
                        # EC2 refuses the flag (even "false") on a launch with several
                        # interfaces, and never gives those a public address anyway.
                        associate_public_ip_address="false" if cards == 1 else None,
                        delete_on_termination="true",
                    )
                    for card in range(cards)
                ],
                tags=tags(c, f"{name}-efa-lt"),
                opts=child(self),
            )
        self.placement_groups = {
            key: aws.ec2.PlacementGroup(
                f"{name}-{key}-pg",
                strategy="cluster",
                tags=tags(c, f"{name}-{key}-pg", {"deepfleet:replica": key}),
                opts=child(self),
            )
            for key in args.placement_groups
        }
        group_of = {n: key for key, nodes in args.placement_groups.items() for n in nodes}
        self.hosts = {}
        for node in args.nodes:
            placement = self.placement_groups.get(group_of.get(node, ""))
            self.hosts[node] = GpuHost(
                f"{name}-{node}",
                GpuHostArgs(
                    cluster=c,
                    node=node,
                    instance_type=args.instance_type,
                    ami=args.ami,
                    key_name=args.key_name,
                    root_volume_gb=args.root_volume_gb,
                    subnet_id=args.subnet_id,
                    security_group_ids=[sg],
                    launch_template_id=self.launch_template.id if self.launch_template else None,
                    placement_group=placement.name if placement else None,
                    nvme_drives=INSTANCE_STORE_DRIVES.get(args.instance_type, 0),
                    nvme_mount=args.nvme_mount,
                ),
                opts=child(self),
            )
        self.register_outputs(
            {
                "security_group_id": sg,
                "private_ips": {n: h.private_ip for n, h in self.hosts.items()},
            }
        )


@dataclass(frozen=True)
class ServiceHostArgs:
    cluster: str
    node: str
    groups: Sequence[str]
    instance_type: str
    ami: str
    key_name: str
    subnet_id: pulumi.Input[str]
    security_group_ids: Sequence[pulumi.Input[str]]
    root_volume_gb: int = SERVICE_ROOT_VOLUME_GB


class ServiceHost(pulumi.ComponentResource):
    instance: aws.ec2.Instance
    private_ip: pulumi.Output[str]

    def __init__(
        self, name: str, args: ServiceHostArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("ServiceHost"), name, None, opts)
        self.instance = aws.ec2.Instance(
            f"{name}-instance",
            ami=args.ami,
            instance_type=args.instance_type,
            key_name=args.key_name,
            subnet_id=args.subnet_id,
            vpc_security_group_ids=list(args.security_group_ids),
            associate_public_ip_address=False,
            root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                volume_size=args.root_volume_gb, volume_type="gp3", encrypted=True
            ),
            metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                http_tokens="required", http_endpoint="enabled"
            ),
            user_data=_cloud_config(args.node),
            tags=tags(args.cluster, args.node, {"deepfleet:group": ",".join(args.groups)}),
            opts=child(self),
        )
        self.private_ip = self.instance.private_ip
        self.register_outputs({"private_ip": self.private_ip, "instance_id": self.instance.id})


@dataclass(frozen=True)
class ServicePoolArgs:
    cluster: str
    # Node name -> its spec groups (lb, monitoring, storage, nat...).
    nodes: Mapping[str, Sequence[str]]
    vpc_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]
    instance_type: str
    ami: str
    key_name: str
    admin_cidrs: Sequence[str]
    ssh_port: int = 22
    # Extra groups for load-balancer nodes (the LB's group, which may reach the engine ports).
    lb_security_group_ids: Sequence[pulumi.Input[str]] = ()
    # Ports that admins reach on these nodes (Grafana, Prometheus).
    admin_ports: Sequence[int] = ()
    # Ports that these nodes scrape on the GPU nodes (node exporter, DCGM exporter).
    gpu_security_group_id: pulumi.Input[str] | None = None
    gpu_metrics_ports: Sequence[int] = ()


class ServicePool(pulumi.ComponentResource):
    security_group: aws.ec2.SecurityGroup
    hosts: dict[str, ServiceHost]

    def __init__(
        self, name: str, args: ServicePoolArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(token("ServicePool"), name, None, opts)
        c = args.cluster
        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description="deepfleet service nodes: SSH and dashboards from admins",
            tags=tags(c, f"{name}-sg"),
            opts=child(self),
        )
        sg = self.security_group.id
        for i, cidr in enumerate(args.admin_cidrs):
            for port in (args.ssh_port, *args.admin_ports):
                ingress(
                    self,
                    f"{name}-admin-{port}-{i}",
                    sg,
                    description=f"port {port} from admin network {cidr}",
                    from_port=port,
                    cidr=cidr,
                    cluster=c,
                )
        egress_all(self, f"{name}-egress", sg, ANYWHERE, c)
        if args.gpu_security_group_id is not None:
            for port in args.gpu_metrics_ports:
                ingress(
                    self,
                    f"{name}-scrape-{port}",
                    args.gpu_security_group_id,
                    description=f"metrics port {port} from the service nodes",
                    from_port=port,
                    source_security_group_id=sg,
                    cluster=c,
                )
        self.hosts = {
            node: ServiceHost(
                f"{name}-{node}",
                ServiceHostArgs(
                    cluster=c,
                    node=node,
                    groups=groups,
                    instance_type=args.instance_type,
                    ami=args.ami,
                    key_name=args.key_name,
                    subnet_id=args.subnet_id,
                    security_group_ids=[
                        sg,
                        *(args.lb_security_group_ids if "lb" in groups else []),
                    ],
                ),
                opts=child(self),
            )
            for node, groups in args.nodes.items()
        }
        self.register_outputs(
            {
                "security_group_id": sg,
                "private_ips": {n: h.private_ip for n, h in self.hosts.items()},
            }
        )
