"""Pulumi mock tests: the resource graph of each example stack and the security policies.

The mocks are installed before the program or the components are imported (the Pulumi SDK's
testing rule). Every stack runs the real `__main__.py` with stack config, as `pulumi up` would,
and `infra.pulumi_graph.run_offline` records each resource's inputs as the engine would see them
(camelCase names, numbers as floats, secrets still wrapped).

Each policy is a function returning its violations. The policy tests assert none for the real
stacks, and `test_policy_catches_its_breach` feeds every policy a recording broken on purpose,
so that a policy which could never fail fails the suite.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import runpy
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml
from pulumi.runtime import rpc

from infra.pulumi_graph import OfflineMocks, RecordedResource, Recording, run_offline

pulumi.runtime.set_mocks(OfflineMocks(), project="deepfleet", stack="test", preview=False)
# pulumi-aws and pulumi-command warn about their own deprecated resources when imported.
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:DeprecationWarning")

# The program's modules come after the mocks.
from infra.components import (  # noqa: E402
    BareMetalHost,
    BareMetalHostArgs,
    GpuNodePool,
    GpuNodePoolArgs,
)
from infra.components.cluster import nvme_mount  # noqa: E402
from infra.components.hosts import (  # noqa: E402
    INSTANCE_STORE_DRIVES,
    NVME_SCRIPT,
    NVME_SCRIPT_PATH,
    NVME_SERVICE,
    gpu_user_data,
    mount_unit_name,
)
from infra.pulumi_graph import render_tree, resource_graph  # noqa: E402
from infra.spec import ClusterSpec, load_spec  # noqa: E402
from infra.validators import ConfigRejected  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
MAIN = PROJECT / "__main__.py"
AWS_SPEC = "hosts/example-aws.yaml"
BAREMETAL_SPEC = "hosts/example-baremetal.yaml"
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-test-only\n-----END OPENSSH PRIVATE KEY-----"
DEPLOY_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItestonly deepfleet-deploy"
MAAS_KEY = "consumer:token:secret-test-only"
# Cluster name -> spec file of every stack run here (variants get names of their own).
SPEC_FILES: dict[str, Path] = {}

INSTANCE = "aws:ec2/instance:Instance"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
COMMAND = "command:remote:Command"


# --- running stacks ------------------------------------------------------------------------


def run_stack(spec: str | Path, **config: str) -> Recording:
    """Run `__main__.py` for a spec with the stack config `pulumi up` would have."""
    values = {"deepfleet:spec": str(spec), **{f"deepfleet:{k}": v for k, v in config.items()}}
    path = Path(spec) if Path(spec).is_absolute() else PROJECT / spec
    loaded = load_spec(path)
    SPEC_FILES[loaded.name] = path
    if loaded.provider.aws is not None:
        values["aws:region"] = loaded.provider.aws.region
    secrets = [k for k in values if k.endswith(("sshPrivateKey", "maasApiKey"))]
    return run_offline(lambda: runpy.run_path(str(MAIN), run_name="__pulumi__"), values, secrets)


def run_baremetal(**config: str) -> Recording:
    return run_stack(BAREMETAL_SPEC, sshPrivateKey=SSH_KEY, deployPublicKey=DEPLOY_KEY, **config)


def aws_variant(tmp_path: Path, name: str, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the AWS example changed by `change`, written to a temporary spec file."""
    data = yaml.safe_load((PROJECT / AWS_SPEC).read_text(encoding="utf-8"))
    data["name"] = f"example-aws-{name}"
    change(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def two_node_replica(data: dict[str, Any]) -> None:
    gpu = next(n for n in data["nodes"] if n["name"] == "gpu-01")
    data["nodes"].insert(1, {**gpu, "name": "gpu-02"})
    data["deployments"][0]["replicas"] = [["gpu-01", "gpu-02"]]
    data["deployments"][0]["parallelism"] = {"tp": 16}


def without_efa_on_efs(data: dict[str, Any]) -> None:
    data["provider"]["aws"]["efa"] = False
    data["storage"][0]["kind"] = "efs"
    # The model cache on the instance-store NVMe.
    data["storage"][0]["local_cache"] = "/nvme/models"


@pytest.fixture(scope="module")
def aws() -> Recording:
    return run_stack(AWS_SPEC)


@pytest.fixture(scope="module")
def baremetal() -> Recording:
    return run_baremetal()


@pytest.fixture(scope="module")
def aws_multinode(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    return run_stack(aws_variant(tmp_path_factory.mktemp("spec"), "multi", two_node_replica))


@pytest.fixture(scope="module")
def aws_plain(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    return run_stack(aws_variant(tmp_path_factory.mktemp("spec"), "plain", without_efa_on_efs))


# --- reading recordings --------------------------------------------------------------------


def plain(value: Any) -> Any:
    return rpc.unwrap_rpc_secret(value) if rpc.is_rpc_secret(value) else value


def sg_id(rec: Recording, name_suffix: str) -> str:
    (group,) = [
        r
        for r in rec.of_type("aws:ec2/securityGroup:SecurityGroup")
        if r.name.endswith(name_suffix)
    ]
    return f"{group.name}-id"


def rules_on(rec: Recording, group_id: str) -> list[RecordedResource]:
    return [r for r in rec.of_type(INGRESS) if r.inputs["securityGroupId"] == group_id]


def covers(rule: RecordedResource, port: int) -> bool:
    if rule.inputs["ipProtocol"] == "-1":
        return True
    return bool(rule.inputs["fromPort"] <= port <= rule.inputs["toPort"])


def spec_of(rec: Recording) -> ClusterSpec:
    """The spec a recording was made from (the Cluster component's name is the spec's name)."""
    (cluster,) = rec.of_type("deepfleet:infra:Cluster")
    return load_spec(SPEC_FILES[cluster.name])


def gpu_instances(rec: Recording) -> list[RecordedResource]:
    hosts = {r.name for r in rec.of_type("deepfleet:infra:GpuHost")}
    return [r for r in rec.of_type(INSTANCE) if r.parent in hosts]


def private_subnet(rec: Recording) -> str:
    (subnet,) = [r for r in rec.of_type("aws:ec2/subnet:Subnet") if r.name.endswith("-private")]
    return f"{subnet.name}-id"


# --- policies: each yields what breaks it ---------------------------------------------------


def world_open_admin_or_engine_ports(rec: Recording) -> Iterator[str]:
    """No ingress from 0.0.0.0/0 on SSH or an engine port."""
    spec = spec_of(rec)
    ports = [spec.site.ssh.port, *(d.port for d in spec.deployments)]
    for rule in rec.of_type(INGRESS):
        cidr = rule.inputs.get("cidrIpv4")
        if cidr is None:
            continue
        network = ipaddress.ip_network(cidr)
        for port in ports:
            if covers(rule, port) and network.prefixlen == 0:
                yield f"{rule.name}: port {port} open to {cidr}"


def gpu_group_admits_too_much(rec: Recording) -> Iterator[str]:
    """GPU group: SSH only from admin CIDRs, engine ports only from the LB group, all-traffic
    only from itself."""
    spec = spec_of(rec)
    admin = {str(c) for c in spec.site.admin_cidrs}
    gpu, lb = sg_id(rec, "-gpu-sg"), sg_id(rec, "-lb-sg")
    engine_ports = {d.port for d in spec.deployments}
    monitoring = spec.monitoring
    metrics = (
        {monitoring.node_exporter_port, monitoring.dcgm_exporter_port} if monitoring else set()
    )
    svc = sg_id(rec, "-svc-sg")
    lustre = {sg_id(rec, f"-{s.name}-sg") for s in spec.storage if s.kind == "fsx-lustre"}
    for rule in rules_on(rec, gpu):
        cidr, source = rule.inputs.get("cidrIpv4"), rule.inputs.get("referencedSecurityGroupId")
        if rule.inputs["ipProtocol"] == "-1":
            if source != gpu or cidr is not None:
                yield f"{rule.name}: all traffic from {cidr or source}, not the GPU group itself"
        elif cidr is not None:
            if not (
                covers(rule, spec.site.ssh.port)
                and rule.inputs["fromPort"] == rule.inputs["toPort"]
            ):
                yield f"{rule.name}: ports {rule.inputs['fromPort']}-{rule.inputs['toPort']} from {cidr}"
            elif cidr not in admin:
                yield f"{rule.name}: SSH from {cidr}, not an admin network"
        elif any(covers(rule, p) for p in engine_ports):
            if source != lb:
                yield f"{rule.name}: engine port from {source}, not the LB group"
        elif source in lustre:
            if (rule.inputs["fromPort"], rule.inputs["toPort"]) not in LUSTRE_RANGES:
                yield f"{rule.name}: ports {rule.inputs['fromPort']}-{rule.inputs['toPort']} from storage"
        elif not (source == svc and rule.inputs["fromPort"] in metrics):
            yield f"{rule.name}: unexpected rule from {source}"


def public_gpu_instances(rec: Recording) -> Iterator[str]:
    """GPU instances: private subnet, no public address, directly or through their template."""
    private = private_subnet(rec)
    templates = {f"{r.name}-id": r for r in rec.of_type("aws:ec2/launchTemplate:LaunchTemplate")}
    subnets = {f"{r.name}-id": r for r in rec.of_type("aws:ec2/subnet:Subnet")}
    if subnets[private].inputs.get("mapPublicIpOnLaunch") is not False:
        yield "the private subnet maps public IPs on launch"
    instances = gpu_instances(rec)
    if not instances:
        yield "no GPU instances"
    for instance in instances:
        launch = instance.inputs.get("launchTemplate")
        if launch is None:
            if instance.inputs.get("subnetId") != private:
                yield f"{instance.name}: subnet {instance.inputs.get('subnetId')}"
            if instance.inputs.get("associatePublicIpAddress") is not False:
                yield f"{instance.name}: associatePublicIpAddress is not False"
            continue
        nics = templates[launch["id"]].inputs["networkInterfaces"]
        for nic in nics:
            if nic.get("subnetId") != private:
                yield f"{instance.name}: template interface in {nic.get('subnetId')}"
            flag = nic.get("associatePublicIpAddress")
            # With several interfaces EC2 never assigns a public address (and refuses the flag).
            if flag != "false" and not (flag is None and len(nics) > 1):
                yield f"{instance.name}: template interface associatePublicIpAddress={flag!r}"
        if "subnetId" in instance.inputs or instance.inputs.get("associatePublicIpAddress"):
            yield f"{instance.name}: sets its own network beside the launch template"


def nat_not_on_private_egress(rec: Recording) -> Iterator[str]:
    """The private route table's 0.0.0.0/0 goes through the NAT gateway, which has an EIP and
    sits in the public subnet; the private subnet uses that table."""
    private_rt = next(
        r for r in rec.of_type("aws:ec2/routeTable:RouteTable") if r.name.endswith("-private-rt")
    )
    rt_id = f"{private_rt.name}-id"
    routes = [
        r
        for r in rec.of_type("aws:ec2/route:Route")
        if r.inputs["routeTableId"] == rt_id and r.inputs.get("destinationCidrBlock") == "0.0.0.0/0"
    ]
    (gateway,) = rec.of_type("aws:ec2/natGateway:NatGateway")
    (eip,) = rec.of_type("aws:ec2/eip:Eip")
    if [r.inputs.get("natGatewayId") for r in routes] != [f"{gateway.name}-id"]:
        yield f"private default routes: {[dict(r.inputs) for r in routes]}"
    if gateway.inputs.get("allocationId") != eip.state["allocationId"]:
        yield "the NAT gateway does not use the EIP"
    public = next(r for r in rec.of_type("aws:ec2/subnet:Subnet") if r.name.endswith("-public"))
    if gateway.inputs.get("subnetId") != f"{public.name}-id":
        yield "the NAT gateway is not in the public subnet"
    associations = {
        r.inputs["subnetId"]: r.inputs["routeTableId"]
        for r in rec.of_type("aws:ec2/routeTableAssociation:RouteTableAssociation")
    }
    if associations.get(private_subnet(rec)) != rt_id:
        yield "the private subnet does not use the private route table"


def lb_misconfigured(rec: Recording) -> Iterator[str]:
    """Internal NLB; per deployment a target group on the engine port, health-checked with HTTP
    /health on it, the replicas' rank-0 instances attached, and a listener on the LB port."""
    spec = spec_of(rec)
    assert spec.load_balancer is not None
    (nlb,) = rec.of_type("aws:lb/loadBalancer:LoadBalancer")
    if nlb.inputs.get("internal") is not True or nlb.inputs.get("loadBalancerType") != "network":
        yield "the load balancer is not an internal NLB"
    groups = {
        r.inputs["tags"]["deepfleet:deployment"]: r
        for r in rec.of_type("aws:lb/targetGroup:TargetGroup")
    }
    listeners = rec.of_type("aws:lb/listener:Listener")
    attachments = rec.of_type("aws:lb/targetGroupAttachment:TargetGroupAttachment")
    instances = {r.inputs["tags"]["Name"]: f"{r.name}-id" for r in rec.of_type(INSTANCE)}
    if sorted(groups) != sorted(d.name for d in spec.deployments):
        yield f"target groups {sorted(groups)}"
    for i, deployment in enumerate(spec.deployments):
        group = groups.get(deployment.name)
        if group is None:
            continue
        check = group.inputs.get("healthCheck", {})
        if (check.get("protocol"), check.get("path"), check.get("port")) != (
            "HTTP",
            "/health",
            str(deployment.port),
        ):
            yield f"{group.name}: health check {check}"
        if group.inputs.get("port") != deployment.port:
            yield f"{group.name}: port {group.inputs.get('port')}"
        arn = group.state["arn"]
        targets = sorted(
            a.inputs["targetId"] for a in attachments if a.inputs["targetGroupArn"] == arn
        )
        if targets != sorted(instances[r[0]] for r in deployment.replicas):
            yield f"{group.name}: targets {targets}"
        ports = [
            listener.inputs["port"]
            for listener in listeners
            if listener.inputs["defaultActions"][0]["targetGroupArn"] == arn
        ]
        if ports != [spec.load_balancer.port + i]:
            yield f"{group.name}: listener ports {ports}"
    allowed = {str(c) for c in spec.load_balancer.allowed_cidrs}
    for rule in rules_on(rec, sg_id(rec, "-lb-sg")):
        if rule.inputs.get("cidrIpv4") not in allowed:
            yield f"{rule.name}: LB port from {rule.inputs.get('cidrIpv4')}"


def storage_groups(rec: Recording) -> dict[str, str]:
    """Storage name -> id of its security group, for every cloud file system of the spec."""
    spec = spec_of(rec)
    return {
        s.name: sg_id(rec, f"-{s.name}-sg") for s in spec.storage if s.kind in ("fsx-lustre", "efs")
    }


def storage_reachable_elsewhere(rec: Recording) -> Iterator[str]:
    """Storage admits only the GPU nodes' group (and, for Lustre, its own servers): never a
    CIDR, since the private subnet also holds the LB and monitoring instances and the NLB."""
    gpu = sg_id(rec, "-gpu-sg")
    groups = storage_groups(rec)
    if not groups:
        yield "no storage security group"
    for group in groups.values():
        rules = rules_on(rec, group)
        if not any(r.inputs.get("referencedSecurityGroupId") == gpu for r in rules):
            yield f"{group}: the GPU nodes cannot mount"
        for rule in rules:
            source = rule.inputs.get("referencedSecurityGroupId")
            if rule.inputs.get("cidrIpv4") is not None:
                yield f"{rule.name}: from {rule.inputs['cidrIpv4']}"
            if source not in (gpu, group):
                yield f"{rule.name}: from group {source}"
    for fs in rec.of_type("aws:fsx/lustreFileSystem:LustreFileSystem"):
        if fs.inputs["subnetIds"] != private_subnet(rec) or fs.inputs["securityGroupIds"] != list(
            groups.values()
        ):
            yield f"{fs.name}: subnet {fs.inputs['subnetIds']}, groups {fs.inputs['securityGroupIds']}"
    for target in rec.of_type("aws:efs/mountTarget:MountTarget"):
        if target.inputs["subnetId"] != private_subnet(rec) or target.inputs[
            "securityGroups"
        ] != list(groups.values()):
            yield f"{target.name}: subnet {target.inputs['subnetId']}"


EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
# AWS's FSx for Lustre guide ("File system access control with Amazon VPC"): TCP 988 and
# 1018-1023, in and out, between the file system's group and itself and its clients' group.
LUSTRE_RANGES = ((988, 988), (1018, 1023))


def covers_range(rule: RecordedResource, low: int, high: int) -> bool:
    if rule.inputs["ipProtocol"] == "-1":
        return True
    return bool(
        rule.inputs["ipProtocol"] == "tcp"
        and rule.inputs["fromPort"] <= low
        and high <= rule.inputs["toPort"]
    )


def lustre_rules_incomplete(rec: Recording) -> Iterator[str]:
    """Every Lustre port range open both ways between the file system's group and itself, and
    between it and the GPU nodes' group, on both groups."""
    gpu = sg_id(rec, "-gpu-sg")
    filesystems = rec.of_type("aws:fsx/lustreFileSystem:LustreFileSystem")
    if not filesystems:
        yield "no Lustre file system"

    def allows(direction: str, on: str, peer: str, low: int, high: int) -> bool:
        for rule in rec.of_type(INGRESS if direction == "in" else EGRESS):
            if rule.inputs["securityGroupId"] != on or not covers_range(rule, low, high):
                continue
            if rule.inputs.get("referencedSecurityGroupId") == peer:
                return True
            # The GPU group's egress to anywhere reaches the file system too.
            if direction == "out" and rule.inputs.get("cidrIpv4") == "0.0.0.0/0":
                return True
        return False

    for fs in filesystems:
        (group,) = fs.inputs["securityGroupIds"]
        for low, high in LUSTRE_RANGES:
            wanted = [
                ("in", group, group, "file system from itself"),
                ("out", group, group, "file system to itself"),
                ("in", group, gpu, "file system from the GPU nodes"),
                ("out", group, gpu, "file system to the GPU nodes"),
                ("in", gpu, group, "GPU nodes from the file system"),
                ("out", gpu, group, "GPU nodes to the file system"),
            ]
            for direction, on, peer, what in wanted:
                if not allows(direction, on, peer, low, high):
                    yield f"{fs.name}: TCP {low}-{high} not open: {what}"


def mentions(value: Any, needle: str) -> bool:
    """Whether `needle` is (part of) a string anywhere inside `value`, secrets unwrapped."""
    if isinstance(value, str):
        return needle in value
    if isinstance(value, dict):
        return any(mentions(v, needle) for v in value.values())
    if isinstance(value, list | tuple):
        return any(mentions(v, needle) for v in value)
    return False


def ssh_key_exposed(rec: Recording) -> Iterator[str]:
    """The bootstrap key appears only inside secrets: never in a plain output or input."""
    for key, value in rec.outputs.items():
        if mentions(value, SSH_KEY) and key not in rec.secret_outputs:
            yield f"stack output {key} shows the key"
    for resource in rec.resources:
        for prop, value in resource.inputs.items():
            if not rpc.is_rpc_secret(value) and mentions(value, SSH_KEY):
                yield f"{resource.name}.{prop} carries the key in plain text"
    commands = rec.of_type(COMMAND)
    if not commands:
        yield "no bootstrap commands"
    for command in commands:
        if not rpc.is_rpc_secret(command.state.get("connection")):
            yield f"{command.name}: connection is not secret"
        elif plain(command.state["connection"]).get("privateKey") != SSH_KEY:
            yield f"{command.name}: connects without the configured key"


def commands_off_target(rec: Recording) -> Iterator[str]:
    """Each node gets its three bootstrap commands, at its spec address, user and port."""
    spec = spec_of(rec)
    by_node: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for command in rec.of_type(COMMAND):
        by_node.setdefault(command.parent or "", []).append(
            (command.name.rsplit("-", 1)[-1], plain(command.inputs["connection"]))
        )
    expected = {f"{spec.name}-{n.name}": n for n in spec.nodes}
    if set(by_node) != set(expected):
        yield f"commands on {sorted(by_node)}, nodes {sorted(expected)}"
    for host, node in expected.items():
        commands = by_node.get(host, [])
        if len(commands) != 3:
            yield f"{host}: {len(commands)} commands"
        for step, connection in commands:
            want = (str(node.address), spec.site.ssh.user, float(spec.site.ssh.port))
            got = (connection.get("host"), connection.get("user"), connection.get("port"))
            if got != want:
                yield f"{host} {step}: connects to {got}, spec says {want}"


def replica_split_across_placement(rec: Recording) -> Iterator[str]:
    """The nodes of each multi-node replica share one cluster placement group."""
    groups = rec.of_type("aws:ec2/placementGroup:PlacementGroup")
    names = {r.state["name"]: r for r in groups}
    by_node = {r.inputs["tags"]["Name"]: r.inputs.get("placementGroup") for r in gpu_instances(rec)}
    if not groups:
        yield "no placement group"
    for group in groups:
        if group.inputs.get("strategy") != "cluster":
            yield f"{group.name}: strategy {group.inputs.get('strategy')}"
    placed = {pg for pg in by_node.values() if pg is not None}
    if len(placed) != 1 or len(by_node) < 2 or None in by_node.values():
        yield f"placement per node: {by_node}"
    elif placed - set(names):
        yield f"unknown placement group {placed}"


POLICIES: dict[str, Callable[[Recording], Iterator[str]]] = {
    "world": world_open_admin_or_engine_ports,
    "gpu-group": gpu_group_admits_too_much,
    "public-gpu": public_gpu_instances,
    "nat": nat_not_on_private_egress,
    "lb": lb_misconfigured,
    "storage": storage_reachable_elsewhere,
    "lustre": lustre_rules_incomplete,
    "secret": ssh_key_exposed,
    "commands": commands_off_target,
    "placement": replica_split_across_placement,
}


# --- the resource graph ----------------------------------------------------------------------

AWS_COUNTS = {
    "deepfleet:infra:Cluster": 1,
    "deepfleet:infra:Network": 1,
    "deepfleet:infra:NatGateway": 1,
    "deepfleet:infra:GpuNodePool": 1,
    "deepfleet:infra:GpuHost": 1,
    "deepfleet:infra:LoadBalancer": 1,
    "deepfleet:infra:ServicePool": 1,
    "deepfleet:infra:ServiceHost": 1,
    "deepfleet:infra:SharedStorage": 1,
    "aws:ec2/vpc:Vpc": 1,
    "aws:ec2/subnet:Subnet": 2,
    "aws:ec2/internetGateway:InternetGateway": 1,
    "aws:ec2/routeTable:RouteTable": 2,
    "aws:ec2/route:Route": 2,
    "aws:ec2/routeTableAssociation:RouteTableAssociation": 2,
    "aws:ec2/eip:Eip": 1,
    "aws:ec2/natGateway:NatGateway": 1,
    "aws:ec2/securityGroup:SecurityGroup": 4,
    # GPU: SSH, fabric; LB: API, engine; service: SSH, Grafana, Prometheus, 2 scrapes;
    # storage: 2 Lustre ranges from the GPU group and from itself, and on the GPU group from it.
    INGRESS: 15,
    # GPU, LB, service: one each; storage: 2 Lustre ranges to the GPU group and to itself.
    EGRESS: 7,
    "aws:ec2/launchTemplate:LaunchTemplate": 1,
    INSTANCE: 2,
    "aws:lb/loadBalancer:LoadBalancer": 1,
    "aws:lb/targetGroup:TargetGroup": 1,
    "aws:lb/targetGroupAttachment:TargetGroupAttachment": 1,
    "aws:lb/listener:Listener": 1,
    "aws:fsx/lustreFileSystem:LustreFileSystem": 1,
}
BAREMETAL_COUNTS = {"deepfleet:infra:Cluster": 1, "deepfleet:infra:BareMetalHost": 6, COMMAND: 18}


@pytest.mark.parametrize(
    ("spec", "counts"), [(AWS_SPEC, AWS_COUNTS), (BAREMETAL_SPEC, BAREMETAL_COUNTS)]
)
def test_resource_graph_of_example_stacks(spec: str, counts: dict[str, int]) -> None:
    rows = resource_graph(load_spec(PROJECT / spec))
    assert dict(Counter(r.type for r in rows)) == counts
    names = {r.name for r in rows}
    assert len(names) == len(rows), "resource names are unique"
    assert all(r.parent in names for r in rows if r.parent is not None)
    assert [r.parent for r in rows].count(None) == 1, "one root: the Cluster component"


def test_graph_matches_the_program(aws: Recording, baremetal: Recording) -> None:
    """`resource_graph` (what plan lists) builds what `__main__.py` builds."""
    for rec, spec in ((aws, AWS_SPEC), (baremetal, BAREMETAL_SPEC)):
        graph = resource_graph(load_spec(PROJECT / spec))
        assert sorted((r.type, r.name, r.parent) for r in graph) == sorted(
            (r.type, r.name, r.parent) for r in rec.resources
        )


def test_children_are_parented_and_named_from_their_component(
    aws: Recording, baremetal: Recording
) -> None:
    for rec in (aws, baremetal):
        components = {r.name: r for r in rec.resources if r.type.startswith("deepfleet:infra:")}
        for resource in rec.resources:
            if resource.parent is None:
                assert resource.type == "deepfleet:infra:Cluster"
                continue
            assert resource.parent in components, resource.name
            assert resource.name.startswith(resource.parent + "-"), resource.name


# --- the policies on the real stacks ----------------------------------------------------------


@pytest.mark.parametrize("policy", ["world", "gpu-group", "public-gpu", "nat", "lb", "storage"])
@pytest.mark.parametrize("stack", ["aws", "aws_plain", "aws_multinode"])
def test_aws_policy_holds(policy: str, stack: str, request: pytest.FixtureRequest) -> None:
    rec: Recording = request.getfixturevalue(stack)
    assert list(POLICIES[policy](rec)) == []


@pytest.mark.parametrize("stack", ["aws", "aws_multinode"])
def test_lustre_ports_open_both_ways_as_aws_documents(
    stack: str, request: pytest.FixtureRequest
) -> None:
    rec: Recording = request.getfixturevalue(stack)
    assert list(lustre_rules_incomplete(rec)) == []
    # Nothing beyond the documented ports: the storage group's egress is Lustre only.
    (fs,) = rec.of_type("aws:fsx/lustreFileSystem:LustreFileSystem")
    egress = [
        r
        for r in rec.of_type(EGRESS)
        if r.inputs["securityGroupId"] == fs.inputs["securityGroupIds"][0]
    ]
    assert sorted((r.inputs["fromPort"], r.inputs["toPort"]) for r in egress) == [
        (988.0, 988.0),
        (988.0, 988.0),
        (1018.0, 1023.0),
        (1018.0, 1023.0),
    ]


@pytest.mark.parametrize("policy", ["world", "secret", "commands"])
def test_baremetal_policy_holds(policy: str, baremetal: Recording) -> None:
    assert list(POLICIES[policy](baremetal)) == []


def test_multinode_replica_shares_one_placement_group(
    aws_multinode: Recording, aws: Recording
) -> None:
    assert list(replica_split_across_placement(aws_multinode)) == []
    (group,) = aws_multinode.of_type("aws:ec2/placementGroup:PlacementGroup")
    assert group.inputs["strategy"] == "cluster"
    # A single-node replica needs none.
    assert aws.of_type("aws:ec2/placementGroup:PlacementGroup") == []
    assert aws_multinode.outputs["placement_groups"] == {"r1-r0": group.state["name"]}
    assert (
        sorted(r.inputs["placementGroup"] for r in gpu_instances(aws_multinode))
        == [group.state["name"]] * 2
    )


def test_efa_interfaces_follow_the_instance_type(aws: Recording, aws_plain: Recording) -> None:
    (template,) = aws.of_type("aws:ec2/launchTemplate:LaunchTemplate")
    nics = template.inputs["networkInterfaces"]
    assert len(nics) == 32  # p5e.48xlarge
    assert {n["interfaceType"] for n in nics} == {"efa"}
    assert sorted(n["networkCardIndex"] for n in nics) == list(range(32))
    assert aws_plain.of_type("aws:ec2/launchTemplate:LaunchTemplate") == []


def test_efs_variant_mounts_from_the_gpu_group_only(aws_plain: Recording) -> None:
    (target,) = aws_plain.of_type("aws:efs/mountTarget:MountTarget")
    rules = rules_on(aws_plain, target.inputs["securityGroups"][0])
    assert [(r.inputs["fromPort"], r.inputs.get("referencedSecurityGroupId")) for r in rules] == [
        (2049, sg_id(aws_plain, "-gpu-sg"))
    ]
    assert aws_plain.outputs["storage_mount_targets"]["models"].endswith(".amazonaws.com:/")


# --- instance-store NVMe ----------------------------------------------------------------------


def user_data(rec: Recording, node: str) -> str:
    (instance,) = [r for r in rec.of_type(INSTANCE) if r.inputs["tags"]["Name"] == node]
    return str(instance.inputs["userData"])


def written_files(cloud_config: str) -> dict[str, str]:
    assert cloud_config.startswith("#cloud-config\n")
    return {f["path"]: f["content"] for f in yaml.safe_load(cloud_config)["write_files"]}


def test_gpu_instances_make_their_nvme_into_the_model_cache(
    aws: Recording, aws_plain: Recording
) -> None:
    for rec, mount, unit in (
        (aws, "/nvme", "nvme.mount"),  # no local_cache: the default place
        (aws_plain, "/nvme/models", "nvme-models.mount"),  # storage[0].local_cache
    ):
        config = yaml.safe_load(user_data(rec, "gpu-01"))
        assert config["hostname"] == "gpu-01"
        files = written_files(user_data(rec, "gpu-01"))
        assert files[NVME_SCRIPT_PATH] == NVME_SCRIPT.read_text()
        assert f"ExecStart={NVME_SCRIPT_PATH} 8\n" in files[f"/etc/systemd/system/{NVME_SERVICE}"]
        mount_unit = files[f"/etc/systemd/system/{unit}"]
        assert f"Where={mount}\n" in mount_unit
        assert f"Requires={NVME_SERVICE}\n" in mount_unit
        assert ["systemctl", "enable", "--now", unit] in config["runcmd"]
    # Service instances have no instance store to prepare.
    assert user_data(aws, "lb-01") == "#cloud-config\nhostname: lb-01\npreserve_hostname: false\n"


def test_types_without_instance_store_get_only_a_hostname() -> None:
    assert "p4d.24xlarge" in INSTANCE_STORE_DRIVES and "g6e.48xlarge" not in INSTANCE_STORE_DRIVES
    assert gpu_user_data("gpu-01", 0, "/nvme") == (
        "#cloud-config\nhostname: gpu-01\npreserve_hostname: false\n"
    )


def _with_caches(spec: ClusterSpec, *caches: str | None) -> ClusterSpec:
    (store,) = spec.storage
    stores = [
        store.model_copy(update={"name": f"{store.name}{i}", "local_cache": cache})
        for i, cache in enumerate(caches)
    ]
    return spec.model_copy(update={"storage": stores})


def test_nvme_mount_follows_the_local_cache() -> None:
    spec = load_spec(PROJECT / AWS_SPEC)
    assert nvme_mount(spec) == "/nvme"
    assert nvme_mount(_with_caches(spec, "/nvme/models/", None, "/nvme/models")) == "/nvme/models"
    with pytest.raises(ValueError, match="same local_cache"):
        nvme_mount(_with_caches(spec, "/nvme/a", "/nvme/b"))
    with pytest.raises(ValueError, match="/var is a system directory"):
        nvme_mount(_with_caches(spec, "/var"))


@pytest.mark.parametrize("path", ["/nvme", "/nvme/models/", "/data/model-cache", "/x y/.z"])
def test_mount_unit_names_match_systemd_escape(path: str) -> None:
    escape = shutil.which("systemd-escape")
    if escape is None:
        pytest.skip("needs systemd-escape (systemd)")
    expected = subprocess.run(
        [escape, "--path", "--suffix=mount", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert mount_unit_name(path) == expected


def _verify_units(files: dict[str, str]) -> None:
    """`systemd-analyze verify` of the user data's units in a scratch root that also holds its
    script, executable (`check_systemd_units` verifies every file it gets as a unit and writes
    none executable, so it cannot take the script)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("needs systemd-analyze (systemd)")
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
        for merged in ("lib", "bin", "sbin"):
            (root / merged).symlink_to(f"usr/{merged}")
        units = []
        for path, content in files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
            if path == NVME_SCRIPT_PATH:
                target.chmod(0o755)
            else:
                units.append(str(target))
        result = subprocess.run(
            [analyze, "verify", "--man=no", f"--root={root}", *units],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or result.stderr.strip():
            raise ConfigRejected("systemd-analyze verify", ", ".join(files), result.stderr)


@pytest.mark.validators
def test_nvme_units_pass_systemd_analyze(aws_plain: Recording) -> None:
    files = written_files(user_data(aws_plain, "gpu-01"))
    _verify_units(files)
    # The check can fail: a mount unit whose name does not match its Where= is refused.
    broken = {p: c.replace("Where=/nvme/models", "Where=/nvme/other") for p, c in files.items()}
    with pytest.raises(ConfigRejected, match="Where"):
        _verify_units(broken)


@pytest.mark.validators
@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck")
def test_nvme_script_passes_shellcheck() -> None:
    result = subprocess.run(["shellcheck", str(NVME_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# The script run against a fake /sys and fake blkid/mdadm/mkfs.ext4/udevadm that log their
# arguments; blkid answers from files in the state directory.
FAKE_TOOLS = {
    "blkid": """#!/bin/bash
echo "blkid $*" >> "$STATE/log"
if [ "$1" = -L ]; then [ -e "$STATE/made" ] && echo /dev/md/deepfleet-nvme && exit 0; exit 2; fi
drive=${*: -1}
sig="$STATE/signature-${drive##*/}"
[ -e "$sig" ] || exit 2
if [ "$2" = "-o" ] && [ "$3" = value ]; then sed -n 's/^TYPE=//p' "$sig"; else cat "$sig"; fi
""",
    "mdadm": """#!/bin/bash
echo "mdadm $*" >> "$STATE/log"
if [ "$1" = --assemble ]; then touch "$STATE/made"; fi
""",
    "mkfs.ext4": '#!/bin/bash\necho "mkfs.ext4 $*" >> "$STATE/log"\ntouch "$STATE/made"\n',
    "udevadm": '#!/bin/bash\necho "udevadm $*" >> "$STATE/log"\n',
}
INSTANCE_STORE = "Amazon EC2 NVMe Instance Storage"


def _run_nvme_script(
    tmp_path: Path, drives: dict[str, str], expected: int, signatures: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    state, tools, sysfs = tmp_path / "state", tmp_path / "bin", tmp_path / "sys"
    for directory in (state, tools):
        directory.mkdir(exist_ok=True)
    for name, body in FAKE_TOOLS.items():
        (tools / name).write_text(body)
        (tools / name).chmod(0o755)
    for name, model in drives.items():
        device = sysfs / "block" / name / "device"
        device.mkdir(parents=True, exist_ok=True)
        (device / "model").write_text(f"{model}\n")
    for name, signature in (signatures or {}).items():
        (state / f"signature-{name}").write_text(signature)
    result = subprocess.run(
        ["bash", str(NVME_SCRIPT), str(expected)],
        capture_output=True,
        text=True,
        env={
            "PATH": f"{tools}:/usr/bin:/bin",
            "STATE": str(state),
            "DEEPFLEET_SYSFS": str(sysfs),
            "DEEPFLEET_NVME_WAIT_S": "0",
        },
        check=False,
    )
    log = state / "log"
    return result, log.read_text().splitlines() if log.exists() else []


P5_DRIVES = {
    "nvme0n1": "Amazon Elastic Block Store",  # the root volume
    **{f"nvme{i}n1": INSTANCE_STORE for i in range(1, 9)},
}


def test_nvme_script_builds_raid0_of_the_instance_store_once(tmp_path: Path) -> None:
    result, log = _run_nvme_script(tmp_path, P5_DRIVES, 8)
    assert result.returncode == 0, result.stderr
    store = " ".join(f"/dev/nvme{i}n1" for i in range(1, 9))
    assert (
        "mdadm --create /dev/md/deepfleet-nvme --name=deepfleet-nvme --level=0 --raid-devices=8 "
        f"--run {store}"
    ) in log
    assert "mkfs.ext4 -q -F -L deepfleet-nvme -m 0 -E nodiscard /dev/md/deepfleet-nvme" in log
    assert not any("nvme0n1" in line for line in log), "the EBS root volume is never touched"
    # Next boot: the file system is there; nothing is created again.
    (tmp_path / "state" / "log").unlink()
    result, log = _run_nvme_script(tmp_path, P5_DRIVES, 8)
    assert result.returncode == 0
    assert "nothing to do" in result.stdout
    assert not any(line.startswith(("mdadm", "mkfs")) for line in log)


def test_nvme_script_formats_a_single_drive_without_mdadm(tmp_path: Path) -> None:
    result, log = _run_nvme_script(tmp_path, {"nvme1n1": INSTANCE_STORE}, 1)
    assert result.returncode == 0, result.stderr
    assert not any(line.startswith("mdadm") for line in log)
    assert "mkfs.ext4 -q -F -L deepfleet-nvme -m 0 -E nodiscard /dev/nvme1n1" in log


def test_nvme_script_assembles_the_array_after_a_reboot(tmp_path: Path) -> None:
    members = {f"nvme{i}n1": "TYPE=linux_raid_member\n" for i in range(1, 9)}
    result, log = _run_nvme_script(tmp_path, P5_DRIVES, 8, members)
    assert result.returncode == 0, result.stderr
    assert "mdadm --assemble --scan" in log
    assert not any(line.startswith(("mdadm --create", "mkfs")) for line in log)


def test_nvme_script_refuses_a_drive_in_use(tmp_path: Path) -> None:
    result, log = _run_nvme_script(
        tmp_path, P5_DRIVES, 8, {"nvme3n1": "DEVNAME=/dev/nvme3n1\nTYPE=xfs\n"}
    )
    assert result.returncode == 1
    assert "/dev/nvme3n1 is not blank" in result.stderr and "wipefs" in result.stderr
    assert not any(line.startswith(("mdadm", "mkfs")) for line in log)


def test_nvme_script_says_when_drives_are_missing(tmp_path: Path) -> None:
    result, log = _run_nvme_script(tmp_path, {"nvme0n1": "Amazon Elastic Block Store"}, 8)
    assert result.returncode == 1
    assert "found 0 instance-store NVMe drives (none), expected 8" in result.stderr
    assert not any(line.startswith(("mdadm", "mkfs")) for line in log)


# --- outputs feed pyinfra ---------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["aws", "baremetal"])
def test_outputs_feed_the_inventory(
    stack: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infra.inventory import OUTPUTS_VARIABLE, inventory_groups

    rec: Recording = request.getfixturevalue(stack)
    spec = load_spec(PROJECT / (AWS_SPEC if stack == "aws" else BAREMETAL_SPEC))
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps(rec.outputs), encoding="utf-8")  # as `pulumi stack output --json`
    monkeypatch.setenv(OUTPUTS_VARIABLE, str(outputs))
    groups = inventory_groups(spec)
    hosts = {name: data["ssh_hostname"] for entries in groups.values() for name, data in entries}
    assert hosts == rec.outputs["node_addresses"]
    assert set(hosts) == {n.name for n in spec.nodes}
    assert rec.outputs["node_groups"]["gpu"] == [n.name for n in spec.nodes_in("gpu")]


def test_aws_outputs(aws: Recording) -> None:
    assert aws.outputs["lb_endpoint"].endswith(".elb.us-east-2.amazonaws.com:8000")
    assert aws.outputs["storage_mount_targets"]["models"].endswith("@tcp:/mockmnt")
    assert aws.secret_outputs == set()


def test_baremetal_outputs(baremetal: Recording) -> None:
    assert baremetal.outputs["lb_endpoint"] == "192.0.2.20:443"
    # The NFS server's address on the storage network.
    assert baremetal.outputs["storage_mount_targets"] == {"models": "198.51.100.30:/srv/models"}


# --- bare metal specifics ---------------------------------------------------------------------


def test_bootstrap_key_is_sent_as_a_secret_even_when_given_plain() -> None:
    """The component wraps the key itself: a plain key never reaches the engine in clear."""

    def program() -> None:
        host = BareMetalHost(
            "unit-gpu-01",
            BareMetalHostArgs(
                cluster="unit",
                node="gpu-01",
                address="192.0.2.11",
                groups=["gpu"],
                ssh_user="root",
                ssh_port=2222,
                private_key=SSH_KEY,
            ),
        )
        assert set(host.commands) == {"hostname", "python"}  # no deploy key: no key step

    rec = run_offline(program)
    assert len(rec.of_type(COMMAND)) == 2
    assert list(ssh_key_exposed(rec)) == []
    assert all("sudo" not in r.inputs["create"] for r in rec.of_type(COMMAND))  # root


@pulumi.runtime.test  # type: ignore[untyped-decorator]
def test_gpu_pool_outputs_place_a_replica_together() -> pulumi.Output[None]:
    """Component outputs, read the SDK's way: a 2-node replica shares its placement group and
    neither instance asks for a public address."""
    pool = GpuNodePool(
        "unit-gpu",
        GpuNodePoolArgs(
            cluster="unit",
            nodes=["gpu-01", "gpu-02", "gpu-03"],
            vpc_id="vpc-1",
            subnet_id="subnet-private",
            instance_type="p4d.24xlarge",
            ami="ami-1",
            key_name="admin",
            root_volume_gb=400,
            admin_cidrs=["192.0.2.0/26"],
            efa=False,
            placement_groups={"r1-r0": ["gpu-01", "gpu-02"]},
        ),
    )
    instances = [pool.hosts[n].instance for n in ("gpu-01", "gpu-02", "gpu-03")]

    def check(values: list[Any]) -> None:
        group, placed, public, subnets = values[0], values[1:4], values[4:7], values[7:10]
        assert placed == [group, group, None], "the replica shares one group; gpu-03 has none"
        assert public == [False, False, False]
        assert subnets == ["subnet-private"] * 3

    return pulumi.Output.all(
        pool.placement_groups["r1-r0"].name,
        *[i.placement_group for i in instances],
        *[i.associate_public_ip_address for i in instances],
        *[i.subnet_id for i in instances],
    ).apply(check)


def test_bootstrap_commands_do_what_pyinfra_needs(baremetal: Recording) -> None:
    scripts = {
        r.name.removeprefix("example-baremetal-"): r.inputs["create"]
        for r in baremetal.of_type(COMMAND)
    }
    assert DEPLOY_KEY in scripts["gpu-01-deploy-key"]
    assert "authorized_keys" in scripts["gpu-01-deploy-key"]
    assert "hostnamectl set-hostname gpu-01" in scripts["gpu-01-hostname"]
    assert "sudo -n " in scripts["gpu-01-hostname"]  # the spec's SSH user is not root
    assert "apt-get install -y -q python3" in scripts["gpu-01-python"]


def test_maas_only_with_maas_url(baremetal: Recording) -> None:
    assert baremetal.of_type("deepfleet:infra:MaasMachine") == []
    rec = run_baremetal(maasUrl="http://maas.example.com:5240/MAAS", maasApiKey=MAAS_KEY)
    machines = rec.of_type("command:local:Command")
    assert len(machines) == 6
    for machine in machines:
        environment = machine.inputs["environment"]
        assert rpc.is_rpc_secret(environment), "the MAAS API key stays secret"
        assert "machine deploy" in machine.inputs["create"]
    assert not mentions(rec.outputs, MAAS_KEY)


def test_aws_region_must_match_the_spec() -> None:
    values = {"deepfleet:spec": AWS_SPEC, "aws:region": "eu-west-1"}
    with pytest.raises(Exception, match="aws:region is 'eu-west-1' but the spec says 'us-east-2'"):
        run_offline(lambda: runpy.run_path(str(MAIN), run_name="__pulumi__"), values)


def test_baremetal_needs_the_secret_key() -> None:
    with pytest.raises(Exception, match="deepfleet:sshPrivateKey"):
        run_stack(BAREMETAL_SPEC)


# --- every policy can fail ----------------------------------------------------------------------


def _edit(rec: Recording, pick: Callable[[RecordedResource], bool], **changes: Any) -> Recording:
    """A copy of `rec` where the first resource `pick` selects gets `changes` in its inputs."""
    resources = list(rec.resources)
    index = next(i for i, r in enumerate(resources) if pick(r))
    target = resources[index]
    inputs = {**target.inputs, **changes}
    state = {**target.state, **changes}
    resources[index] = dataclasses.replace(target, inputs=inputs, state=state)
    return dataclasses.replace(rec, resources=resources)


def _drop(rec: Recording, suffix: str) -> Recording:
    """A copy of `rec` without the one resource whose name ends with `suffix`."""
    kept = [r for r in rec.resources if not r.name.endswith(suffix)]
    assert len(kept) == len(rec.resources) - 1, suffix
    return dataclasses.replace(rec, resources=kept)


def _named(suffix: str) -> Callable[[RecordedResource], bool]:
    return lambda r: r.name.endswith(suffix)


BREACHES: list[tuple[str, str, Callable[[Recording], Recording]]] = [
    ("world", "aws", lambda rec: _edit(rec, _named("-gpu-ssh-0"), cidrIpv4="0.0.0.0/0")),
    (
        "world",
        "aws",
        lambda rec: _edit(
            rec, _named("-lb-r1-api-0"), fromPort=30000.0, toPort=30000.0, cidrIpv4="0.0.0.0/0"
        ),
    ),
    ("gpu-group", "aws", lambda rec: _edit(rec, _named("-gpu-ssh-0"), cidrIpv4="10.0.0.0/8")),
    (
        "gpu-group",
        "aws",
        lambda rec: _edit(
            rec, _named("-lb-engine-30000"), referencedSecurityGroupId="example-aws-svc-sg-id"
        ),
    ),
    (
        "gpu-group",
        "aws",
        lambda rec: _edit(
            rec, _named("-gpu-fabric"), referencedSecurityGroupId="example-aws-lb-sg-id"
        ),
    ),
    (
        "public-gpu",
        "aws_plain",
        lambda rec: _edit(rec, _named("-gpu-01-instance"), associatePublicIpAddress=True),
    ),
    (
        "public-gpu",
        "aws_plain",
        lambda rec: _edit(rec, _named("-gpu-01-instance"), subnetId="example-aws-net-public-id"),
    ),
    ("public-gpu", "aws", lambda rec: _edit(rec, _named("-net-private"), mapPublicIpOnLaunch=True)),
    (
        "public-gpu",
        "aws",
        lambda rec: _edit(
            rec,
            _named("-gpu-efa-lt"),
            networkInterfaces=[
                {**n, "subnetId": "example-aws-net-public-id"}
                for n in rec.named("example-aws-gpu-efa-lt").inputs["networkInterfaces"]
            ],
        ),
    ),
    (
        "nat",
        "aws",
        lambda rec: _edit(
            rec,
            _named("-nat-private-default"),
            natGatewayId=None,
            gatewayId="example-aws-net-igw-id",
        ),
    ),
    (
        "nat",
        "aws",
        lambda rec: _edit(rec, _named("-nat-gw"), subnetId="example-aws-net-private-id"),
    ),
    (
        "lb",
        "aws",
        lambda rec: _edit(
            rec, _named("-lb-r1-tg"), healthCheck={"protocol": "HTTP", "path": "/", "port": "30000"}
        ),
    ),
    ("lb", "aws", lambda rec: _edit(rec, _named("-lb-r1-listener"), port=80.0)),
    ("lb", "aws", lambda rec: _edit(rec, _named("-lb-nlb"), internal=False)),
    # The first version: the whole private subnet (LB, monitoring, NLB too) could mount.
    (
        "storage",
        "aws",
        lambda rec: _edit(
            rec,
            _named("-models-gpu-988"),
            referencedSecurityGroupId=None,
            cidrIpv4="10.42.16.0/20",
        ),
    ),
    (
        "storage",
        "aws",
        lambda rec: _edit(
            rec, _named("-models-gpu-1018"), referencedSecurityGroupId="example-aws-svc-sg-id"
        ),
    ),
    (
        "storage",
        "aws_plain",
        lambda rec: _edit(
            rec,
            _named("-models-gpu-2049"),
            referencedSecurityGroupId=None,
            cidrIpv4="10.42.16.0/20",
        ),
    ),
    ("lustre", "aws", lambda rec: _drop(rec, "-models-client-1018")),
    ("lustre", "aws", lambda rec: _drop(rec, "-models-to-gpu-988")),
    ("lustre", "aws", lambda rec: _drop(rec, "-models-self-988")),
    ("lustre", "aws", lambda rec: _edit(rec, _named("-models-to-self-1018"), toPort=1020.0)),
    (
        "gpu-group",
        "aws",
        lambda rec: _edit(rec, _named("-models-client-1018"), fromPort=0.0, toPort=65535.0),
    ),
    (
        "storage",
        "aws",
        lambda rec: _edit(
            rec, _named("-models-self-988"), referencedSecurityGroupId="example-aws-lb-sg-id"
        ),
    ),
    (
        "storage",
        "aws_plain",
        lambda rec: _edit(
            rec, _named("-models-mount-target-0"), subnetId="example-aws-net-public-id"
        ),
    ),
    (
        "secret",
        "baremetal",
        lambda rec: _edit(
            rec,
            _named("gpu-01-hostname"),
            connection=plain(rec.named("example-baremetal-gpu-01-hostname").inputs["connection"]),
        ),
    ),
    (
        "secret",
        "baremetal",
        lambda rec: dataclasses.replace(rec, outputs={**rec.outputs, "key": SSH_KEY}),
    ),
    (
        "commands",
        "baremetal",
        lambda rec: _edit(
            rec,
            _named("gpu-02-python"),
            connection={
                **plain(rec.named("example-baremetal-gpu-02-python").inputs["connection"]),
                "host": "192.0.2.13",
            },
        ),
    ),
    (
        "commands",
        "baremetal",
        lambda rec: dataclasses.replace(
            rec, resources=[r for r in rec.resources if not r.name.endswith("lb-01-python")]
        ),
    ),
    (
        "placement",
        "aws_multinode",
        lambda rec: _edit(rec, _named("-gpu-02-instance"), placementGroup=None),
    ),
    ("placement", "aws_multinode", lambda rec: _edit(rec, _named("-r1-r0-pg"), strategy="spread")),
]


@pytest.mark.parametrize(
    ("policy", "stack", "breach"),
    BREACHES,
    ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BREACHES)],
)
def test_policy_catches_its_breach(
    policy: str,
    stack: str,
    breach: Callable[[Recording], Recording],
    request: pytest.FixtureRequest,
) -> None:
    rec: Recording = request.getfixturevalue(stack)
    assert list(POLICIES[policy](rec)) == [], "the unbroken stack passes"
    assert list(POLICIES[policy](breach(rec))) != [], "the broken stack fails"


def test_lab_specs_have_no_stack_and_trees_indent() -> None:
    assert resource_graph(load_spec(PROJECT / "hosts/lab.yaml")) == []
    lines = render_tree(resource_graph(load_spec(PROJECT / BAREMETAL_SPEC)))
    assert lines[0] == "example-baremetal (deepfleet:infra:Cluster)"
    assert lines[1] == "  example-baremetal-gpu-01 (deepfleet:infra:BareMetalHost)"
    assert lines[2] == "    example-baremetal-gpu-01-deploy-key (command:remote:Command)"
