"""The whole cluster of one spec: what `__main__.py` builds, and what `infra.pulumi_graph`
runs offline to list a stack's resources.

Backend `aws` builds Network -> NatGateway -> GpuNodePool -> LoadBalancer -> ServicePool ->
SharedStorage; backend `baremetal` records the machines and bootstraps each one with a
BareMetalHost. Outputs are what pyinfra needs (`node_addresses`, read by `infra.inventory`)
and what people ask for (groups, LB endpoint, storage mount targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from infra.components.baremetal import BareMetalHost, BareMetalHostArgs, MaasMachineArgs
from infra.components.hosts import (
    DEFAULT_NVME_MOUNT,
    GpuNodePool,
    GpuNodePoolArgs,
    ServicePool,
    ServicePoolArgs,
)
from infra.components.load_balancer import LoadBalancer, LoadBalancerArgs, TargetDeployment
from infra.components.nat import NatGateway, NatGatewayArgs
from infra.components.network import Network, NetworkArgs
from infra.components.storage import SharedStorage, SharedStorageArgs
from infra.spec import GROUPS, AwsProvider, ClusterSpec, Node

CLOUD_STORAGE_KINDS = ("fsx-lustre", "efs")
# Mounting the instance store over one of these would hide the system.
SYSTEM_DIRS = frozenset(
    {"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/mnt", "/opt", "/proc", "/root"}
    | {"/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/cache"}
)


@dataclass(frozen=True)
class ClusterArgs:
    spec: ClusterSpec
    # Secret (`deepfleet:sshPrivateKey`): the key Pulumi's bootstrap commands log in with.
    # Needed by the baremetal backend only.
    ssh_private_key: pulumi.Input[str] | None = None
    # `deepfleet:deployPublicKey`: the public key pyinfra uses, installed by the bootstrap.
    deploy_public_key: str | None = None
    # `deepfleet:maasUrl` / secret `deepfleet:maasApiKey`: re-image bare metal through MAAS.
    maas_url: str | None = None
    maas_api_key: pulumi.Input[str] | None = None
    maas_distro_series: str = "noble"


def placement_groups(spec: ClusterSpec) -> dict[str, list[str]]:
    """One cluster placement group per multi-node replica: key `<deployment>-r<index>`."""
    return {
        f"{d.name}-r{i}": list(replica)
        for d in spec.deployments
        for i, replica in enumerate(d.replicas)
        if len(replica) > 1
    }


def nvme_mount(spec: ClusterSpec) -> str:
    """Where GPU instances mount their instance-store NVMe: the spec's model cache
    (`storage[].local_cache`, one directory for every store), else `DEFAULT_NVME_MOUNT`."""
    caches = sorted({s.local_cache.rstrip("/") or "/" for s in spec.storage if s.local_cache})
    if not caches:
        return DEFAULT_NVME_MOUNT
    if len(caches) > 1:
        raise ValueError(
            f"storage[].local_cache: {', '.join(caches)}: the instance-store NVMe is one file "
            f"system mounted at one place; give every store the same local_cache (models keep "
            f"their own paths under it)"
        )
    if caches[0] in SYSTEM_DIRS:
        raise ValueError(
            f"storage[].local_cache: {caches[0]} is a system directory and the instance-store "
            f"NVMe would be mounted over it; use a directory of its own, e.g. /nvme/models"
        )
    return caches[0]


def _storage_address(node: Node, networks: list[str]) -> str:
    """The server's address on one of the storage's networks, else its management address."""
    for entry in node.addresses:
        if entry.network in networks:
            return str(entry.address)
    return str(node.address)


class Cluster(pulumi.ComponentResource):
    node_addresses: pulumi.Output[dict[str, str]]
    node_groups: dict[str, list[str]]
    lb_endpoint: pulumi.Output[str] | None
    storage_mount_targets: pulumi.Output[dict[str, str]]
    extra_outputs: dict[str, pulumi.Input[object]]
    # What `__main__.py` exports: the keys above plus lb_endpoint and the AWS ids.
    stack_outputs: dict[str, pulumi.Input[object]]

    def __init__(
        self, name: str, args: ClusterArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("deepfleet:infra:Cluster", name, None, opts)
        spec = args.spec
        self.node_groups = {g: [n.name for n in spec.nodes_in(g)] for g in GROUPS}
        self.lb_endpoint = None
        self.extra_outputs = {}
        if spec.provider.kind == "aws":
            assert spec.provider.aws is not None  # the spec model guarantees it
            self._build_aws(name, spec, spec.provider.aws)
        elif spec.provider.kind == "baremetal":
            self._build_baremetal(name, spec, args)
        else:
            raise ValueError(
                f"provider kind {spec.provider.kind!r} has no Pulumi program: lab nodes are made "
                "by `deepfleet lab up`"
            )
        outputs: dict[str, pulumi.Input[object]] = {
            "node_addresses": self.node_addresses,
            "node_groups": self.node_groups,
            "storage_mount_targets": self.storage_mount_targets,
            **self.extra_outputs,
        }
        if self.lb_endpoint is not None:
            outputs["lb_endpoint"] = self.lb_endpoint
        self.stack_outputs = outputs
        self.register_outputs(outputs)

    def _build_aws(self, name: str, spec: ClusterSpec, aws_: AwsProvider) -> None:
        child = pulumi.ResourceOptions(parent=self)
        admin_cidrs = [str(c) for c in spec.site.admin_cidrs]
        network = Network(
            f"{name}-net",
            NetworkArgs(
                cluster=spec.name,
                vpc_cidr=str(aws_.vpc_cidr),
                public_subnet_cidr=str(aws_.public_subnet_cidr),
                private_subnet_cidr=str(aws_.private_subnet_cidr),
                availability_zone=aws_.availability_zone,
            ),
            child,
        )
        nat = NatGateway(
            f"{name}-nat",
            NatGatewayArgs(
                cluster=spec.name,
                public_subnet_id=network.public_subnet.id,
                private_route_table_id=network.private_route_table.id,
            ),
            child,
        )
        gpu_nodes = [n.name for n in spec.nodes_in("gpu")]
        pool = GpuNodePool(
            f"{name}-gpu",
            GpuNodePoolArgs(
                cluster=spec.name,
                nodes=gpu_nodes,
                vpc_id=network.vpc.id,
                subnet_id=network.private_subnet.id,
                instance_type=aws_.gpu_instance_type,
                ami=aws_.ami,
                key_name=aws_.key_name,
                root_volume_gb=aws_.root_volume_gb,
                admin_cidrs=admin_cidrs,
                ssh_port=spec.site.ssh.port,
                efa=aws_.efa,
                placement_groups=placement_groups(spec),
                nvme_mount=nvme_mount(spec),
            ),
            child,
        )
        lb: LoadBalancer | None = None
        if spec.load_balancer is not None and spec.deployments:
            targets = []
            for i, deployment in enumerate(spec.deployments):
                heads = [replica[0] for replica in deployment.replicas]
                unknown = [h for h in heads if h not in pool.hosts]
                if unknown:
                    raise ValueError(
                        f"deployments[{deployment.name}]: {', '.join(unknown)} not in group gpu"
                    )
                targets.append(
                    TargetDeployment(
                        name=deployment.name,
                        engine_port=deployment.port,
                        listen_port=spec.load_balancer.port + i,
                        targets={h: pool.hosts[h].instance.id for h in heads},
                    )
                )
            lb = LoadBalancer(
                f"{name}-lb",
                LoadBalancerArgs(
                    cluster=spec.name,
                    vpc_id=network.vpc.id,
                    vpc_cidr=str(aws_.vpc_cidr),
                    subnet_ids=[network.private_subnet.id],
                    allowed_cidrs=[str(c) for c in spec.load_balancer.allowed_cidrs],
                    deployments=targets,
                    target_security_group_id=pool.security_group.id,
                ),
                child,
            )
            self.lb_endpoint = lb.endpoint
        monitoring = spec.monitoring
        services = ServicePool(
            f"{name}-svc",
            ServicePoolArgs(
                cluster=spec.name,
                nodes={n.name: list(n.groups) for n in spec.nodes if not n.in_group("gpu")},
                vpc_id=network.vpc.id,
                subnet_id=network.private_subnet.id,
                instance_type=aws_.lb_instance_type,
                ami=aws_.ami,
                key_name=aws_.key_name,
                admin_cidrs=admin_cidrs,
                ssh_port=spec.site.ssh.port,
                lb_security_group_ids=[lb.security_group.id] if lb is not None else [],
                admin_ports=[monitoring.grafana_port, monitoring.prometheus_port]
                if monitoring
                else [],
                gpu_security_group_id=pool.security_group.id if monitoring else None,
                gpu_metrics_ports=[monitoring.node_exporter_port, monitoring.dcgm_exporter_port]
                if monitoring
                else [],
            ),
            child,
        )
        private_ips = {n: h.private_ip for n, h in pool.hosts.items()}
        private_ips.update({n: h.private_ip for n, h in services.hosts.items()})
        self.node_addresses = pulumi.Output.all(**private_ips).apply(
            lambda ips: {n: str(ip) for n, ip in ips.items()}
        )
        mounts: dict[str, pulumi.Input[str]] = {}
        for storage in spec.storage:
            if storage.kind in CLOUD_STORAGE_KINDS:
                shared = SharedStorage(
                    f"{name}-{storage.name}",
                    SharedStorageArgs(
                        cluster=spec.name,
                        kind="fsx-lustre" if storage.kind == "fsx-lustre" else "efs",
                        vpc_id=network.vpc.id,
                        vpc_cidr=str(aws_.vpc_cidr),
                        subnet_ids=[network.private_subnet.id],
                        # The GPU nodes' group, not the private subnet: the LB and monitoring
                        # instances share that subnet and have no business with the weights.
                        client_security_group_id=pool.security_group.id,
                    ),
                    child,
                )
                mounts[storage.name] = shared.mount_target
            elif storage.kind == "nfs" and storage.server is not None:
                mounts[storage.name] = pulumi.Output.concat(
                    self.node_addresses[storage.server], ":", storage.export or "/"
                )
        self.storage_mount_targets = pulumi.Output.all(**mounts).apply(dict)
        self.extra_outputs = {
            "vpc_id": network.vpc.id,
            "private_subnet_id": network.private_subnet.id,
            "nat_public_ip": nat.eip.public_ip,
            "gpu_security_group_id": pool.security_group.id,
            "placement_groups": {k: pg.name for k, pg in pool.placement_groups.items()},
        }

    def _build_baremetal(self, name: str, spec: ClusterSpec, args: ClusterArgs) -> None:
        if args.ssh_private_key is None:
            raise ValueError(
                "the baremetal backend needs the bootstrap SSH key: "
                "cat ~/.ssh/<key> | pulumi config set --secret deepfleet:sshPrivateKey"
            )
        maas_key = args.maas_api_key
        if args.maas_url and maas_key is None:
            raise ValueError(
                "deepfleet:maasUrl is set but the API key is not: "
                "pulumi config set --secret deepfleet:maasApiKey <key>"
            )
        hosts: dict[str, BareMetalHost] = {}
        for node in spec.nodes:
            assert node.address is not None  # the spec rules require it on bare metal
            maas = (
                MaasMachineArgs(
                    cluster=spec.name,
                    hostname=node.name,
                    maas_url=args.maas_url,
                    api_key=maas_key,
                    distro_series=args.maas_distro_series,
                )
                if args.maas_url and maas_key is not None
                else None
            )
            hosts[node.name] = BareMetalHost(
                f"{name}-{node.name}",
                BareMetalHostArgs(
                    cluster=spec.name,
                    node=node.name,
                    address=str(node.address),
                    groups=list(node.groups),
                    ssh_user=spec.site.ssh.user,
                    ssh_port=spec.site.ssh.port,
                    private_key=args.ssh_private_key,
                    deploy_public_key=args.deploy_public_key,
                    maas=maas,
                ),
                pulumi.ResourceOptions(parent=self),
            )
        self.node_addresses = pulumi.Output.from_input({n: h.address for n, h in hosts.items()})
        lb = spec.load_balancer
        if lb is not None:
            host = str(lb.vip.address) if lb.vip else str(spec.node(lb.nodes[0]).address)
            self.lb_endpoint = pulumi.Output.from_input(f"{host}:{lb.port}")
        mounts = {
            s.name: f"{_storage_address(spec.node(s.server), s.networks)}:{s.export}"
            for s in spec.storage
            if s.kind == "nfs" and s.server is not None
        }
        self.storage_mount_targets = pulumi.Output.from_input(mounts)
