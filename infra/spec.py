"""The cluster spec: one typed model tree that Pulumi, pyinfra and the CLI all read.

Single-field rules live on the fields (types, ranges, patterns). Rules that relate several parts
of the spec live in `infra.spec_rules` and run after the tree parsed, so that each problem can
name the exact spec path (and, through the loader, the YAML line) it is about.
"""

from __future__ import annotations

import re
from functools import cached_property
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import available_timezones

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
IFACE_PATTERN = r"^[A-Za-z][A-Za-z0-9_.:*-]{0,14}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
InterfaceName = Annotated[str, Field(pattern=IFACE_PATTERN)]
Port = Annotated[int, Field(ge=1, le=65535)]
Mtu = Annotated[int, Field(ge=576, le=9216)]
MacAddress = Annotated[str, Field(pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")]
Group = Literal["gpu", "lb", "nat", "storage", "monitoring"]
GROUPS: tuple[Group, ...] = ("gpu", "lb", "nat", "storage", "monitoring")


class StrictModel(BaseModel):
    """Every spec object: unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class SecretRef(StrictModel):
    """Where a secret comes from at deploy time; the value never enters the repo or a plan."""

    env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    file: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' (a variable name) or 'file' (a path)")
        return self

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


# --- site ----------------------------------------------------------------------------------


class Ntp(StrictModel):
    implementation: Literal["chrony", "timesyncd"] = "chrony"
    servers: list[str] = []
    pools: list[str] = ["pool.ntp.org"]
    makestep_seconds: float = Field(default=1.0, gt=0)
    makestep_limit: int = Field(default=3, ge=-1)
    # Nodes in this list answer NTP for the cluster's networks (allowed clients).
    serve_from: list[Name] = []

    @model_validator(mode="after")
    def _has_source(self) -> Ntp:
        if not self.servers and not self.pools:
            raise ValueError("name at least one NTP server or pool")
        return self


class Dns(StrictModel):
    servers: list[IPv4Address] = Field(min_length=1)
    search: list[str] = []


class Apt(StrictModel):
    mirror: str | None = Field(default=None, pattern=r"^https?://")
    proxy: str | None = Field(default=None, pattern=r"^https?://")


class Ssh(StrictModel):
    user: str = "root"
    port: Port = 22
    # Path of the private key on the controller (the machine running pyinfra), not its content.
    key_file: str | None = None


class Site(StrictModel):
    timezone: str = "UTC"
    ntp: Ntp = Ntp()
    dns: Dns
    apt: Apt = Apt()
    ssh: Ssh = Ssh()
    disable_cloud_init_network: bool = True
    # Who may reach SSH and the inference API from outside the cluster.
    admin_cidrs: list[IPv4Network] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        if value not in available_timezones():
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as Asia/Shanghai)"
            )
        return value

    @field_validator("admin_cidrs")
    @classmethod
    def _not_the_world(cls, value: list[IPv4Network]) -> list[IPv4Network]:
        for cidr in value:
            if cidr.prefixlen == 0:
                raise ValueError("0.0.0.0/0 would open SSH and the API to the world")
        return value


# --- networks and nodes --------------------------------------------------------------------


class Network(StrictModel):
    name: Name
    cidr: IPv4Network
    gateway: IPv4Address | None = None
    mtu: Mtu = 1500
    vlan: int | None = Field(default=None, ge=1, le=4094)
    purpose: Literal["management", "storage", "rdma", "serving", "public"]


class Nic(StrictModel):
    """A family of physical ports, matched by name glob or by MAC addresses."""

    name: InterfaceName
    match: str | None = Field(default=None, pattern=IFACE_PATTERN)
    macs: list[MacAddress] = []
    mtu: Mtu | None = None
    vendor: Literal["intel", "mellanox", "broadcom", "other"] = "other"

    @model_validator(mode="after")
    def _matched_somehow(self) -> Nic:
        if (self.match is None) == (not self.macs):
            raise ValueError("match the ports either by 'match' (a name glob) or by 'macs'")
        return self


class Bond(StrictModel):
    name: InterfaceName
    members: list[InterfaceName] = Field(min_length=1)
    mode: Literal["802.3ad", "active-backup", "balance-xor", "balance-rr", "balance-alb"] = (
        "802.3ad"
    )
    lacp_rate: Literal["fast", "slow"] = "fast"
    mii_monitor_interval: int = Field(default=100, ge=0)
    transmit_hash_policy: Literal["layer2", "layer2+3", "layer3+4", "encap2+3", "encap3+4"] = (
        "layer3+4"
    )
    mtu: Mtu | None = None


class Vlan(StrictModel):
    id: int = Field(ge=1, le=4094)
    link: InterfaceName
    name: InterfaceName | None = None
    mtu: Mtu | None = None

    @property
    def interface(self) -> str:
        return self.name or f"{self.link}.{self.id}"


class Address(StrictModel):
    interface: InterfaceName
    network: Name
    address: IPv4Address
    default_route: bool = False


class Route(StrictModel):
    to: IPv4Network
    via: IPv4Address
    interface: InterfaceName
    metric: int | None = Field(default=None, ge=0)


class Gpus(StrictModel):
    model: str
    count: int = Field(ge=1, le=16)
    memory_gb: float | None = Field(default=None, gt=0)
    nvswitch: bool = False


class RdmaDevice(StrictModel):
    device: str = Field(pattern=r"^[a-z0-9_]+$")
    port: int = Field(default=1, ge=1)
    link_layer: Literal["infiniband", "ethernet"] = "ethernet"
    rate_gbps: int = Field(default=200, gt=0)
    interface: InterfaceName | None = None


class Node(StrictModel):
    name: Name
    groups: list[Group] = Field(min_length=1)
    # The address pyinfra reaches the node at. Cloud nodes get theirs from Pulumi's outputs.
    address: IPv4Address | None = None
    bmc: IPv4Address | None = None
    nics: list[Nic] = []
    bonds: list[Bond] = []
    vlans: list[Vlan] = []
    addresses: list[Address] = []
    routes: list[Route] = []
    nameservers: list[IPv4Address] | None = None
    gpus: Gpus | None = None
    rdma: list[RdmaDevice] = []

    @property
    def interfaces(self) -> list[str]:
        return (
            [n.name for n in self.nics]
            + [b.name for b in self.bonds]
            + [v.interface for v in self.vlans]
        )

    def in_group(self, group: Group) -> bool:
        return group in self.groups


# --- storage, models, serving --------------------------------------------------------------


class Storage(StrictModel):
    name: Name
    kind: Literal["nfs", "fsx-lustre", "efs", "bind"]
    server: Name | None = None  # a node of the spec (nfs)
    export: str | None = Field(default=None, pattern=r"^/")
    mount_point: str = Field(default="/data/models", pattern=r"^/")
    options: list[str] = []
    read_only: bool = True
    # Networks whose nodes may mount it; exports and security groups are limited to them.
    networks: list[Name] = Field(min_length=1)
    local_cache: str | None = Field(default=None, pattern=r"^/")
    # fsx-lustre: AWS's Lustre client apt repository and its signing key (ASCII-armoured); an
    # air-gapped site points these at its mirror.
    client_repository: str = Field(
        default="https://fsx-lustre-client-repo.s3.amazonaws.com/ubuntu", pattern=r"^https?://"
    )
    client_key_url: str = Field(
        default="https://fsx-lustre-client-repo-public-keys.s3.amazonaws.com/fsx-ubuntu-public-key.asc",
        pattern=r"^https?://",
    )

    @model_validator(mode="after")
    def _nfs_needs_server(self) -> Storage:
        if self.kind == "nfs" and (self.server is None or self.export is None):
            raise ValueError("an nfs storage needs 'server' (a node name) and 'export' (a path)")
        return self


class ModelRef(StrictModel):
    name: Name
    source: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")  # Hugging Face id
    storage: Name
    path: str = Field(pattern=r"^[\w.-][\w./-]*$")  # relative to the storage mount point
    dtype: Literal["bf16", "fp16", "fp8", "int8", "int4"] | None = None
    revision: str | None = None


class Parallelism(StrictModel):
    tp: int = Field(default=1, ge=1)
    dp: int = Field(default=1, ge=1)
    ep: int = Field(default=1, ge=1)
    dp_attention: bool = False

    @property
    def gpus(self) -> int:
        # With DP attention SGLang spreads dp over the tp GPUs; otherwise dp copies of a tp group.
        return self.tp if self.dp_attention else self.tp * self.dp


class Disaggregation(StrictModel):
    """Prefill/decode split: which replicas prefill; the others decode."""

    prefill_replicas: list[int] = Field(min_length=1)
    transfer_backend: Literal["mooncake", "nixl"] = "mooncake"
    bootstrap_port: Port = 8998


class Deployment(StrictModel):
    name: Name
    model: Name
    replicas: list[list[Name]] = Field(min_length=1)
    parallelism: Parallelism = Parallelism()
    disaggregation: Disaggregation | None = None
    image: str = Field(pattern=r"^[\w./-]+(:[\w.-]+)?(@sha256:[0-9a-f]{64})?$")
    port: Port = 30000
    dist_port: Port = 5000
    context_length: int | None = Field(default=None, ge=256)
    max_running_requests: int | None = Field(default=None, ge=1)
    mem_fraction_static: float | None = Field(default=None, gt=0, lt=1)
    dist_timeout_s: int = Field(default=3600, ge=60)
    shm_size_gb: int = Field(default=32, ge=1)
    embedding: bool = False
    weight: int = Field(default=100, ge=1, le=256)
    api_key: SecretRef | None = None
    extra_args: list[str] = []
    env: dict[str, str] = {}

    @property
    def nodes_per_replica(self) -> int:
        return len(self.replicas[0])


class Tls(StrictModel):
    certificate: SecretRef  # a PEM with certificate and key, as HAProxy reads it


class Vip(StrictModel):
    address: IPv4Address
    interface: InterfaceName
    router_id: int = Field(default=51, ge=1, le=255)


class LoadBalancer(StrictModel):
    nodes: list[Name] = Field(min_length=1)
    port: Port = 8000
    router: Literal["haproxy", "haproxy+smg", "smg"] = "haproxy"
    router_port: Port = 30100
    tls: Tls | None = None
    api_key: SecretRef | None = None
    vip: Vip | None = None
    stats_port: Port = 8404
    timeout_s: int = Field(default=3600, ge=30)
    # Client networks allowed to call the API; never the whole internet.
    allowed_cidrs: list[IPv4Network] = Field(min_length=1)
    open_webui: bool = False

    @field_validator("allowed_cidrs")
    @classmethod
    def _not_the_world(cls, value: list[IPv4Network]) -> list[IPv4Network]:
        if any(cidr.prefixlen == 0 for cidr in value):
            raise ValueError("0.0.0.0/0 would open the inference API to the world")
        return value


class Nat(StrictModel):
    node: Name
    outside_interface: InterfaceName
    networks: list[Name] = Field(min_length=1)


class Monitoring(StrictModel):
    node: Name
    prometheus_port: Port = 9090
    grafana_port: Port = 3000
    node_exporter_port: Port = 9100
    dcgm_exporter_port: Port = 9400
    scrape_interval_s: int = Field(default=15, ge=1)
    retention_days: int = Field(default=15, ge=1)


class NvidiaStack(StrictModel):
    driver_branch: int = Field(default=570, ge=450)
    driver_flavour: Literal["server", "desktop"] = "server"
    driver_version: str | None = None  # exact package version to pin, e.g. 570.172.08-0ubuntu1
    # nvidia-fabricmanager-<branch> package version; None: the driver's upstream version with
    # NVIDIA's "-1" Debian revision (570.172.08-0ubuntu1 -> 570.172.08-1).
    fabricmanager_version: str | None = None
    open_kernel_modules: bool = False
    allow_reboot: bool = False
    container_toolkit_version: str | None = None
    doca_ofed_version: str | None = None
    # Repositories and their signing keys; an air-gapped site points these at its mirror.
    repository: str = "https://developer.download.nvidia.com/compute/cuda/repos"
    repository_key_url: str = (
        "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64/3bf863cc.pub"
    )
    container_toolkit_repository: str = "https://nvidia.github.io/libnvidia-container/stable/deb"
    container_toolkit_key_url: str = "https://nvidia.github.io/libnvidia-container/gpgkey"
    doca_repository: str = "https://linux.mellanox.com/public/repo/doca"
    doca_key_url: str = "https://linux.mellanox.com/public/repo/doca/GPG-KEY-Mellanox.pub"

    @model_validator(mode="after")
    def _fabricmanager_matches_driver(self) -> NvidiaStack:
        if self.driver_version and self.fabricmanager_version:
            driver, fabric = (
                v.split("-")[0] for v in (self.driver_version, self.fabricmanager_version)
            )
            if driver != fabric:
                raise ValueError(
                    f"fabricmanager_version {self.fabricmanager_version} is not driver "
                    f"{driver}: the fabric manager must run exactly the driver's version"
                )
        return self


class ContainerRuntime(StrictModel):
    """Docker Engine on the nodes that run containers (see docs/gpu-stack.md)."""

    repository: str = "https://download.docker.com/linux/ubuntu"
    key_url: str = "https://download.docker.com/linux/ubuntu/gpg"
    data_root: str = Field(default="/var/lib/docker", pattern=r"^/")
    log_max_size: str = Field(default="100m", pattern=r"^[0-9]+[kmg]$")
    log_max_file: int = Field(default=5, ge=1, le=100)


class AwsProvider(StrictModel):
    region: str
    availability_zone: str
    vpc_cidr: IPv4Network
    public_subnet_cidr: IPv4Network
    private_subnet_cidr: IPv4Network
    ami: str
    key_name: str
    gpu_instance_type: str = "p5e.48xlarge"
    lb_instance_type: str = "c7i.xlarge"
    root_volume_gb: int = Field(default=500, ge=50)
    efa: bool = True


class Provider(StrictModel):
    kind: Literal["baremetal", "aws", "lab"]
    aws: AwsProvider | None = None

    @model_validator(mode="after")
    def _aws_settings(self) -> Provider:
        if self.kind == "aws" and self.aws is None:
            raise ValueError("provider kind 'aws' needs an 'aws:' section")
        if self.kind != "aws" and self.aws is not None:
            raise ValueError("an 'aws:' section only applies to provider kind 'aws'")
        return self


class Lab(StrictModel):
    """Only in lab specs: how the local lab builds the nodes (see docs/lab.md)."""

    bridge: InterfaceName = "dflab0"
    network: Name
    host_address: IPv4Address
    models_dir: str = Field(default="/var/lib/deepfleet-lab/models", pattern=r"^/")


class ClusterSpec(StrictModel):
    name: Name
    provider: Provider
    site: Site
    networks: list[Network] = Field(min_length=1)
    nodes: list[Node] = Field(min_length=1)
    storage: list[Storage] = []
    models: list[ModelRef] = []
    deployments: list[Deployment] = []
    load_balancer: LoadBalancer | None = None
    nat: Nat | None = None
    monitoring: Monitoring | None = None
    nvidia: NvidiaStack = NvidiaStack()
    container_runtime: ContainerRuntime = ContainerRuntime()
    lab: Lab | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, ignored_types=(cached_property,))

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ClusterSpec:
        # Imported here: the rule modules import this one for its types. Importing spec_fit
        # registers the rules that need the model and GPU catalogs.
        import infra.spec_fit  # noqa: F401
        from infra.spec_rules import check_rules

        check_rules(self)
        return self

    # Derived lookups: templates and roles use these rather than searching lists themselves.

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def network(self, name: str) -> Network:
        return next(n for n in self.networks if n.name == name)

    def nodes_in(self, group: Group) -> list[Node]:
        return [n for n in self.nodes if group in n.groups]

    def model(self, name: str) -> ModelRef:
        return next(m for m in self.models if m.name == name)

    def storage_named(self, name: str) -> Storage:
        return next(s for s in self.storage if s.name == name)

    @property
    def is_lab(self) -> bool:
        return self.lab is not None


def interface_address(address: Address, network: Network) -> IPv4Interface:
    return IPv4Interface(f"{address.address}/{network.cidr.prefixlen}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load_spec(path: str | Path) -> ClusterSpec:
    """Parse and validate a spec file; raises `infra.errors.UserError` naming file and line."""
    from infra.spec_loader import load_spec_file

    return load_spec_file(Path(path))
